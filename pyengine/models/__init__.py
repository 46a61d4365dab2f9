"""Model architectures. Each is a small file: weights in, logits out, ops from the backend."""
from pyengine.models.gemma3 import Gemma3
from pyengine.models.gpt2 import GPT2
from pyengine.models.llama import Llama
from pyengine.models.phi3 import Phi3
from pyengine.models.qwen3 import Qwen3

ARCHITECTURES = {"llama": Llama, "gpt2": GPT2, "qwen3": Qwen3, "gemma3": Gemma3, "phi3": Phi3}
