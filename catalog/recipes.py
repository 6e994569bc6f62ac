"""Pre-training recipes: the paper's schedules (Appendix A and B) and a quick CPU preset."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from catalog.defenses import DEFENSES
from catalog.registry import Catalog


class Schedule(BaseModel):
    """Epochs and learning-rate milestones, in epochs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int
    milestones: tuple[int, ...]
    # Epochs trained with the defense's base loss before PC-Loss joins (PCL recipes only).
    warmup_epochs: int = 0
    alpha: float = 0.3

    def scaled(self, epochs: int) -> Schedule:
        """The same schedule stretched or squeezed to ``epochs``, milestones kept in proportion."""

        def scale(epoch: int) -> int:
            return max(1, min(epochs, round(epoch * epochs / self.epochs)))

        milestones = tuple(sorted({scale(m) for m in self.milestones if scale(m) < epochs}))
        warmup = min(scale(self.warmup_epochs), epochs - 1) if self.warmup_epochs else 0
        return self.model_copy(
            update={"epochs": epochs, "milestones": milestones, "warmup_epochs": warmup}
        )


@dataclass(frozen=True)
class RecipeSpec:
    name: str
    title: str
    standard: Schedule  # defense "none"
    adversarial: Schedule  # defense "at"
    prototype: Schedule  # defenses "pcl" and "at-pcl"

    def for_defense(self, defense: str) -> Schedule:
        """The schedule of catalog defense ``defense``: PCL ones take the prototype schedule."""
        kind = DEFENSES.get(defense)
        if kind.prototype:
            return self.prototype
        return self.adversarial if kind.adversarial else self.standard


# PC-Loss recipes (both appendices): 220 epochs, the base loss alone for the first 100.
PCL_EPOCHS, PCL_MILESTONES, PCL_WARMUP = 220, (80, 120, 160, 200), 100

RECIPES: Catalog[RecipeSpec] = Catalog(
    "recipe",
    [
        RecipeSpec(
            name="paper",
            title="Appendix A (CIFAR-10): 120 / 200 / 220 epochs, alpha 0.3",
            standard=Schedule(epochs=120, milestones=(80, 100)),
            adversarial=Schedule(epochs=200, milestones=(90, 120, 150)),
            prototype=Schedule(
                epochs=PCL_EPOCHS, milestones=PCL_MILESTONES, warmup_epochs=PCL_WARMUP, alpha=0.3
            ),
        ),
        RecipeSpec(
            name="paper-tiny-imagenet",
            title="Appendix B (Tiny ImageNet): 200 / 200 / 220 epochs, alpha 0.5",
            standard=Schedule(epochs=200, milestones=(90, 120, 150)),
            adversarial=Schedule(epochs=200, milestones=(90, 120, 150)),
            prototype=Schedule(
                epochs=PCL_EPOCHS, milestones=PCL_MILESTONES, warmup_epochs=PCL_WARMUP, alpha=0.5
            ),
        ),
        RecipeSpec(
            name="quick",
            title="a CPU preset of 8-10 epochs with the paper's shape",
            standard=Schedule(epochs=8, milestones=(5, 7)),
            adversarial=Schedule(epochs=8, milestones=(5, 7)),
            prototype=Schedule(epochs=10, milestones=(6, 8), warmup_epochs=4, alpha=0.3),
        ),
    ],
)


def default_recipe(dataset: str) -> str:
    """The paper's recipe for ``dataset``: Appendix B for Tiny ImageNet, Appendix A otherwise."""
    return "paper-tiny-imagenet" if dataset == "tiny-imagenet" else "paper"
