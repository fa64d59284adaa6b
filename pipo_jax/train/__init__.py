"""Training: the state, the shared loop, the teacher-forced stages (teacher, ar, sft), OPD, the
losses, metrics and the memory planner; `pipeline.train` runs the stages in order."""
