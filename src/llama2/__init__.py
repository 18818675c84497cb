"""llama2: the Llama 2 recipe end to end, from pretraining to a chat model you can serve."""

from llama2.generation.llama import Llama
from llama2.model.args import ModelArgs
from llama2.model.transformer import Transformer
from llama2.tokenizer.chat_format import encode_dialog, encode_dialog_for_training
from llama2.tokenizer.tokenizer import Tokenizer

__all__ = ["Llama", "ModelArgs", "Transformer", "Tokenizer", "encode_dialog", "encode_dialog_for_training"]
__version__ = "0.1.0"
