"""Model architectures. Each is a small file: weights in, logits out, ops from the backend."""
from pyengine.models.gpt2 import GPT2
from pyengine.models.llama import Llama

ARCHITECTURES = {"llama": Llama, "gpt2": GPT2}
