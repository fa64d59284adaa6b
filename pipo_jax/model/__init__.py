"""The model: layers (attention, Gated DeltaNet, MLP), the PIPO wrapper (compressor, backbone,
MTP head, confidence head), LoRA, pair/PAD layout and the logical sharding rules."""
