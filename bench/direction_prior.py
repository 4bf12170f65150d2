"""Has the model learned where a caption's direction puts the object, frame by frame?

    python bench/direction_prior.py checkpoint=runs/t2v_tiny [noises=16 t=0.0]

At t = 0 (pure noise) the flow model's clean estimate x̂1 = x_t + (1 - t)·v̂ is, at the
optimum, the mean of the training clips with that caption: for "moving right" an object
whose average place drifts right over the frames. Per direction word this prints the
centroid of the named colour in the mean estimate over ``noises`` noise draws, first and
last frame, beside the same centroid of the mean of real clips with that caption (the
synthetic set's train split). A model that follows direction shows the data's drift; a
model that has not learned it shows the same centroid in every frame for every word.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import MISSING, OmegaConf

from data.synthetic import DIRECTIONS, SyntheticVideos
from trainer.trained import load_text_to_video

PROMPT = "a red square moving {} quickly"


@dataclass
class Options:
    checkpoint: str = MISSING
    noises: int = 16
    t: float = 0.0
    seed: int = 0
    clips: int = 4000  # training clips scanned for the data's mean per caption


def red_centroids(videos: torch.Tensor) -> torch.Tensor:
    """Mean videos (B, 3, T, H, W) in [-1, 1] -> (B, T, 2) centroid (y, x) of redness."""
    red = (videos[:, 0] - videos[:, 1:].mean(1)).clamp(min=0)
    ys = torch.arange(red.shape[2], dtype=torch.float32).view(1, 1, -1, 1)
    xs = torch.arange(red.shape[3], dtype=torch.float32).view(1, 1, 1, -1)
    mass = red.sum((2, 3)).clamp(min=1e-6)
    return torch.stack([(red * ys).sum((2, 3)) / mass, (red * xs).sum((2, 3)) / mass], -1)


def data_means(data, clips: int) -> torch.Tensor:
    """(4, 3, T, H, W): the mean training clip of each PROMPT, in DIRECTIONS order."""
    train = SyntheticVideos(clips, data.frames, data.height, data.width, data.fps, data.seed)
    sums = {name: [] for name in DIRECTIONS}
    for i in range(clips):
        spec = train.spec(i)
        if (spec.colour, spec.shape, spec.speed) == ("red", "square", "quickly"):
            sums[spec.direction].append(train[i]["video"])
    if not all(sums.values()):
        raise SystemExit(f"no red quickly square for some direction in {clips} clips; raise clips=")
    return torch.stack([torch.stack(sums[name]).mean(0) for name in DIRECTIONS])


@torch.no_grad()
def model_means(run, noises: int, t: float, seed: int) -> torch.Tensor:
    """(4, 3, T, H, W): the mean clean estimate at time t from ``noises`` noise draws."""
    prompts = [PROMPT.format(name) for name in DIRECTIONS]
    context, mask = run.model.text(prompts * noises)
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn((len(prompts) * noises, *run.task.latent_shape), generator=generator)
    x_t = (1 - t) * x0  # the path at t with no data in it: what the model must guess
    velocity = run.model.dit(x_t, torch.full((len(x0),), t), context, mask)
    videos = run.task.autoencoder.decode(x_t + (1 - t) * velocity)
    return videos.view(noises, len(prompts), *videos.shape[1:]).mean(0)


def main(argv: list[str]) -> None:
    opts: Options = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Options),
                                                        OmegaConf.from_cli(argv)))
    run = load_text_to_video(Path(opts.checkpoint), torch.device("cpu"))
    model = red_centroids(model_means(run, opts.noises, opts.t, opts.seed))
    data = red_centroids(data_means(run.cfg.data, opts.clips))
    print(f"centroid (y, x) of red in the mean clean estimate at t={opts.t:g} "
          f"({opts.noises} noises) vs the mean training clip, first -> last frame")
    print("| caption | model y | model x | data y | data x |")
    print("|---|---|---|---|---|")
    for row, name in enumerate(DIRECTIONS):
        cells = [f"{m[0, axis]:.1f} -> {m[-1, axis]:.1f}" for m in (model[row], data[row])
                 for axis in (0, 1)]
        print(f"| {PROMPT.format(name)} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
