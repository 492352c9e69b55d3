"""Qwen-7B (first-generation Qwen, `model_type: qwen`) implemented natively for transformers 5.x.

Importing this package registers `model_type "qwen"` with transformers' Auto classes, so
`AutoConfig` / `AutoModelForCausalLM.from_pretrained(local_qwen_dir)` return these classes
without `trust_remote_code`.
"""

from .chat_format import chat_stop_ids, make_context
from .configuration_qwen import QWenConfig
from .modeling_qwen import QWenLMHeadModel, QWenModel, QWenPreTrainedModel
from .splice import splice_image_features
from .tokenization_qwen import IMAGE_TOKEN, QWenTokenizer

__all__ = [
    "IMAGE_TOKEN",
    "QWenConfig",
    "QWenLMHeadModel",
    "QWenModel",
    "QWenPreTrainedModel",
    "QWenTokenizer",
    "chat_stop_ids",
    "make_context",
    "splice_image_features",
]
