# Correctness runs only: every Triton autotuner keeps its first config, so no autotuning (the math is the same).
import triton.runtime.autotuner as _a

_init = _a.Autotuner.__init__


def _first_config_only(self, fn, arg_names, configs, *args, **kwargs):
    _init(self, fn, arg_names, configs[:1], *args, **kwargs)


_a.Autotuner.__init__ = _first_config_only
