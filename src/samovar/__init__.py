"""samovar: brew your own language models from scratch.

    import samovar
    model, tokenizer = samovar.load("runs/demo/run")
    print(samovar.generate(model, tokenizer, "ROMEO.\n", max_tokens=200, temperature=0.8))
"""

from .api import LLM, chat, generate, load
from .config import PRESETS, ModelConfig, get_preset
from .model import Transformer
from .tokenizer import Tokenizer
from .train import TrainConfig, Trainer

__all__ = ["LLM", "ModelConfig", "PRESETS", "Tokenizer", "TrainConfig", "Trainer", "Transformer",
           "chat", "generate", "get_preset", "load"]
__version__ = "0.1.0"
