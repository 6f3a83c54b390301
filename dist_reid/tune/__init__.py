"""Ray Tune sweeps over any dotted config key (the engine itself knows nothing of Ray)."""

from dist_reid.tune.space import SweepSpec, format_override, load_sweep, validate_sweep

__all__ = ["SweepSpec", "format_override", "load_sweep", "validate_sweep"]
