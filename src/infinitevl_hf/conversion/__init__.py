"""Teacher -> InfiniteVL weight conversion and checkpoint name mapping."""

from .cli import add_convert_arguments, run_convert
from .convert import ConversionError, convert_teacher, parse_attention_layers
from .gdn_init import attention_transfer_init, mimic_init, random_init
from .mapping import to_canonical, to_legacy

__all__ = [
    "ConversionError",
    "add_convert_arguments",
    "attention_transfer_init",
    "convert_teacher",
    "mimic_init",
    "parse_attention_layers",
    "random_init",
    "run_convert",
    "to_canonical",
    "to_legacy",
]
