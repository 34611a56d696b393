"""Dynamic loss scaling for --fp16 (Megatron-LM's DynamicGradScaler).

An inf/NaN gradient skips the step and uses up one unit of hysteresis; when none is left the scale is halved
(never below --min-loss-scale). After --loss-scale-window clean steps in a row the scale doubles and hysteresis is
restored. A static --loss-scale never changes.
"""

from __future__ import annotations


class DynamicLossScaler:
    """Holds the current scale; call update(found_inf) once per step."""

    def __init__(self, config) -> None:
        self.static = config.loss_scale is not None
        self.scale = config.loss_scale if self.static else config.initial_loss_scale
        self.min_scale, self.window, self.hysteresis = config.min_loss_scale, config.loss_scale_window, config.hysteresis
        self.growth_tracker, self.hysteresis_tracker = 0, config.hysteresis

    def update(self, found_inf: bool) -> None:
        if self.static:
            return
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * 0.5, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.window:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale *= 2.0
