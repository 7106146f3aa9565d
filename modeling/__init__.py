"""The Hub remote code (`diffembed_hf.modeling`). Only its module files (`REMOTE_CODE_FILES`) are copied into
checkpoints."""
