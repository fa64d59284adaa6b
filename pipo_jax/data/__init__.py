"""The embedded default data: a generated arithmetic reasoning task, stored with TFDS as
array_record and batched with grain; chat-JSONL trajectories for real SFT.

Import the submodules (`arith`, `mixed`, `loader`, `tfds_builder`, `chat_jsonl`,
`chat_builder`): only `loader` and the builders need TFDS and grain.
"""
