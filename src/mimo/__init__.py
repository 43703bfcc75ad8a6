"""mimo: multimodal training where every module has its own parallel layout and its own ranks."""

from mimo.config import MimoParallelismConfig, ModuleParallelismConfig

__all__ = ["MimoParallelismConfig", "ModuleParallelismConfig"]
__version__ = "0.1.0"
