"""Convert upstream checkpoints (Dream, LLaDA, Qwen2/Llama/Mistral) into Hub-ready DiffEmbed folders.

  * `families` - each upstream layout: config mapping and tensor names,
  * `weights` - source headers validated first, then tensor bytes streamed into safetensors shards,
  * `folder` - source resolution, tokenizer, the assembled folder renamed into place (`convert_checkpoint`).
"""

from ..errors import ConversionError
from .families import FAMILIES, Family, detect_family
from .folder import ConvertOptions, convert_checkpoint
from ..outputs import parse_size

__all__ = ["ConversionError", "ConvertOptions", "FAMILIES", "Family", "convert_checkpoint", "detect_family",
           "parse_size"]
