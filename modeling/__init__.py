"""The Hub remote code (`diffembed_hf.modeling`). Only the two module files are copied into checkpoints."""
