"""``python -m trainer.evaluate checkpoint=<run dir> [guidance=adaptive gamma=0.99 ...]``

How good and how fast is a checkpoint under a sampler? Samples the captions of the
synthetic set's held-out clips (validation split, never trained on) with fixed seeds,
and writes one table per sampler configuration (markdown and JSON under
``<run dir>/evaluation/``, and a wandb table unless wandb is disabled) with a row for:

- the reference: full classifier-free guidance at ``reference_steps`` (50) steps;
- CFG at ``steps``, the baseline an accelerated sampler saves against;
- the chosen sampler (``guidance=adaptive gamma=...``, ``guidance=linear_ag`` after
  ``trainer.linear_guidance`` calibrated it, or ``guidance=none``);
- with ``cache=block|first_block|teacache cache_threshold=...``, the sampler (CFG or
  none) reusing DiT blocks between steps (``models.block_cache``);
- the held-out real clips themselves (the judges' ceiling).

Columns: DiT evaluations per video (NFE; one forward of one sample counts 1) and the
fraction saved against CFG's two per step, DiT block evaluations per video (a block run
for one row of the batch counts 1), where adaptive guidance switched, wall time
and peak memory per video (labelled with how memory was measured), the judges' match
rates (colour, shape, direction, speed), PSNR/SSIM against the reference video of the
same prompt and seed, PSNR against CFG at the sampler's own steps (what an accelerated
sampler should reproduce), and the Fréchet distance to the real clips on the features named in
the table (``trainer.frechet``). The chunk of ``batch`` prompts that starts at prompt i
is seeded ``seed + i`` for every sampler, so two checkpoints, or two samplers, see the
same noise for the same prompt. On a mesh (``launch/torchrun.sh 4 -m trainer.evaluate ...
parallel.tp=2 parallel.cp=2``; ``trainer.mesh_sampling``) every rank samples on its own
shards and rank 0 writes the table; wall time and memory are rank 0's.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omegaconf import MISSING

from data.judges import ATTRIBUTES, match_rates
from data.synthetic import SyntheticVideos
from models.block_cache import CacheSettings
from parallel.mesh import ParallelContext, shutdown
from trainer.block_cache_calibration import cache_settings
from trainer.config import ConfigError, SyntheticDataConfig
from trainer.frechet import FeatureExtractor, feature_extractor, frechet_distance
from trainer.linear_guidance import calibration_path, load_coefficients
from trainer.mesh_sampling import (
    SampleParallelConfig,
    check_split_guidance,
    load_on_mesh,
    split_guidance,
)
from trainer.peak_memory import PeakMemory
from trainer.run_config import parse_cli_options
from trainer.sampling import Cache, Guidance, generate_traced
from trainer.text_following import held_out_prompts
from trainer.trained import TrainedRun
from trainer.video_quality import SSIM_TAPS, psnr, ssim

# Samplers that stop guiding a sample once its cosine passes gamma.
SWITCHING = (Guidance.adaptive, Guidance.linear_ag)


@dataclass
class EvaluateConfig:
    checkpoint: str = MISSING         # a run dir, one of its checkpoints/step_N, or a file
    guidance: Guidance = Guidance.cfg  # the sampler to evaluate beside CFG and the reference
    gamma: float = 0.99               # adaptive, linear_ag: the cosine similarity ending CFG
    steps: int = 25
    scale: float = 5.0                # guidance scale
    reference_steps: int = 50         # the full-CFG reference the PSNR/SSIM compare against
    prompts: int = 48                 # held-out captions (and real clips) to evaluate on
    seed: int = 1234
    batch: int = 8                    # prompts sampled together
    features: str = "auto"            # auto | random_projection | autoencoder | module:fn
    linear_ag_file: str | None = None  # guidance=linear_ag: default <run dir>/guidance/...
    cache: Cache = Cache.none         # also evaluate the sampler reusing DiT blocks
    cache_threshold: float = 0.1      # relative L1 change under which a block is reused
    cache_file: str | None = None     # cache=block: default <run dir>/cache/block_steps...
    output_dir: str | None = None     # default: <run dir>/evaluation
    wandb: str | None = None          # offline | online | disabled; default: the run's mode
    ema: bool = True
    device: str = "cpu"
    # the sampling mesh (trainer.mesh_sampling): under torchrun every rank samples on its
    # shards, the tables are rank 0's
    parallel: SampleParallelConfig = field(default_factory=SampleParallelConfig)

    def __post_init__(self) -> None:
        for key in ("steps", "reference_steps"):
            if getattr(self, key) < 2:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 2 (the "
                                  f"linear-quadratic schedule needs two steps)")
        if self.prompts < 2:
            raise ConfigError(f"prompts={self.prompts} must be >= 2 (a Fréchet distance "
                              f"needs two videos a side)")
        if self.batch < 1:
            raise ConfigError(f"batch={self.batch} must be >= 1")
        if self.gamma != self.gamma:
            raise ConfigError("gamma=nan: pass a cosine threshold such as 0.99")
        if self.wandb not in (None, "offline", "online", "disabled"):
            raise ConfigError(f"wandb={self.wandb} is none of offline, online, disabled")


@dataclass(frozen=True)
class SamplerSpec:
    guidance: Guidance
    steps: int
    scale: float
    gamma: float = 0.99
    linear: torch.Tensor | None = field(default=None, compare=False)  # LinearAG's (S, 3)
    cache: CacheSettings = field(default_factory=CacheSettings, compare=False)
    # (steps + 1,) Euler times; None: the linear-quadratic schedule (a distilled student's own)
    times: torch.Tensor | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        threshold = f" γ̄={self.gamma:g}" if self.guidance in SWITCHING else ""
        cache = (f" + {self.cache.mode} cache δ={self.cache.threshold:g}"
                 if self.cache.mode != "none" else "")
        times = ("" if self.times is None else
                 f" at times [{', '.join(f'{t:.3g}' for t in self.times.tolist())}]")
        return (f"{self.guidance.value}{threshold}{cache}, {self.steps} steps{times}, "
                f"scale {self.scale:g}")


@dataclass
class SampledSet:
    videos: torch.Tensor        # (N, 3, T, H, W) in [-1, 1], on the CPU
    nfe: torch.Tensor           # (N,) long
    block_evaluations: torch.Tensor  # (N,) long
    switch_step: torch.Tensor   # (N,) long, -1 where never switched
    cosine: torch.Tensor        # (S, N) fp64 cosine of cond and uncond velocity, NaN: not run
    seconds: float              # sampling wall time, all N videos
    peak_mib: float | None      # peak memory while sampling (PeakMemory's label says how)


def held_out_clips(data: SyntheticDataConfig, count: int) -> torch.Tensor:
    """The first ``count`` clips of the validation split (those whose captions
    ``held_out_prompts`` returns): (count, 3, T, H, W) in [-1, 1]."""
    val = SyntheticVideos(count, data.frames, data.height, data.width, data.fps, data.seed,
                          split="val")
    return torch.stack([val[i]["video"] for i in range(count)])


def sample_set(run: TrainedRun, spec: SamplerSpec, prompts: list[str], seed: int,
               batch: int, memory: PeakMemory) -> SampledSet:
    """All ``prompts`` under one sampler, ``batch`` at a time, timed and measured."""
    task = run.task
    videos, nfe, blocks, switch, cosine = [], [], [], [], []
    with memory.measure() as peak:
        start = time.perf_counter()
        for first in range(0, len(prompts), batch):
            chunk, trace = generate_traced(run.model, task.autoencoder,
                                           prompts[first: first + batch], task.latent_shape,
                                           spec.steps, spec.scale, seed + first,
                                           spec.guidance, spec.gamma, spec.linear,
                                           times=spec.times, cache=spec.cache)
            videos.append(chunk.float().cpu())
            nfe.append(trace.nfe)
            blocks.append(trace.block_evaluations)
            switch.append(trace.switch_step)
            cosine.append(trace.cosine)
        seconds = time.perf_counter() - start
    return SampledSet(torch.cat(videos), torch.cat(nfe), torch.cat(blocks), torch.cat(switch),
                      torch.cat(cosine, dim=1), seconds, peak.mib)


def score(spec: SamplerSpec, sampled: SampledSet, prompts: list[str],
          reference: torch.Tensor | None, same_steps_cfg: torch.Tensor | None,
          real_features: torch.Tensor, extractor: FeatureExtractor) -> dict:
    """One sampler's table row. ``reference``: the reference videos (None for the
    reference's own row); ``same_steps_cfg``: CFG's videos at the sampler's steps and
    scale (None for CFG itself), what an accelerated sampler should reproduce."""
    videos, switched = sampled.videos, sampled.switch_step >= 0
    nfe = sampled.nfe.double().mean().item()
    switching = spec.guidance in SWITCHING
    row = {"sampler": spec.name, "guidance": spec.guidance.value, "steps": spec.steps,
           "scale": spec.scale,
           "gamma": spec.gamma if spec.guidance in SWITCHING else None,
           "nfe_per_video": nfe, "nfe_saved_vs_cfg": 1 - nfe / (2 * spec.steps),
           "cache": spec.cache.mode,
           "cache_threshold": spec.cache.threshold if spec.cache.mode != "none" else None,
           "block_evaluations_per_video": sampled.block_evaluations.double().mean().item(),
           "switched_fraction": switched.double().mean().item() if switching else None,
           "mean_switch_step": (sampled.switch_step[switched].double().mean().item()
                                if switching and switched.any() else None),
           "seconds_per_video": sampled.seconds / len(videos),
           "peak_memory_mib": sampled.peak_mib,
           **match_rates(list(videos), prompts),
           "psnr_db": None, "ssim": None, "psnr_vs_same_steps_cfg_db": None,
           "frechet": frechet_distance(extractor.features(videos), real_features),
           "switch_steps": sampled.switch_step.tolist(),
           "mean_cosine_by_step": [None if c != c else c
                                   for c in sampled.cosine.nanmean(dim=1).tolist()]}
    if reference is not None:
        row["psnr_db"] = psnr(videos, reference).mean().item()
        if min(videos.shape[-2:]) >= SSIM_TAPS:
            row["ssim"] = ssim(videos, reference).mean().item()
    if same_steps_cfg is not None:
        row["psnr_vs_same_steps_cfg_db"] = psnr(videos, same_steps_cfg).mean().item()
    return row


def warm_up(run: TrainedRun, prompts: list[str], scale: float, seed: int) -> None:
    """An untimed 2-step sample of ``prompts`` (one timed batch): the first forward at a
    batch size pays one-off costs (allocations, kernel choice) the timed rows must not."""
    generate_traced(run.model, run.task.autoencoder, prompts, run.task.latent_shape, 2, scale,
                    seed)


def evaluate_samplers(run: TrainedRun, samplers: list[SamplerSpec], reference: SamplerSpec,
                      prompts: list[str], real: torch.Tensor, extractor: FeatureExtractor,
                      seed: int, batch: int, memory: PeakMemory) -> list[dict]:
    """Rows for the reference, each sampler and the real clips (judged only); every
    sampler gets the same noise per prompt."""
    warm_up(run, prompts[:batch], reference.scale, seed)
    real_features = extractor.features(real)
    reference_set = sample_set(run, reference, prompts, seed, batch, memory)
    rows = [score(reference, reference_set, prompts, None, None, real_features, extractor)]
    cfg_videos: dict[tuple[int, float], torch.Tensor] = {}
    for spec in samplers:
        sampled = sample_set(run, spec, prompts, seed, batch, memory)
        key = (spec.steps, spec.scale)
        plain_cfg = spec.guidance is Guidance.cfg and spec.cache.mode == "none"
        if plain_cfg:
            cfg_videos[key] = sampled.videos
        rows.append(score(spec, sampled, prompts, reference_set.videos,
                          None if plain_cfg else cfg_videos.get(key), real_features,
                          extractor))
    rows.append({"sampler": "held-out real clips", **match_rates(list(real), prompts)})
    return rows


COLUMNS = (("sampler", "sampler", "{}"), ("nfe_per_video", "NFE/video", "{:.1f}"),
           ("nfe_saved_vs_cfg", "NFE saved vs CFG", "{:.1%}"),
           ("block_evaluations_per_video", "blocks/video", "{:.1f}"),
           ("mean_switch_step", "switch step (mean)", "{:.1f}"),
           ("switched_fraction", "switched", "{:.0%}"),
           ("seconds_per_video", "s/video", "{:.3f}"),
           ("peak_memory_mib", "peak MiB", "{:.1f}"),
           *((a, a, "{:.1%}") for a in ATTRIBUTES),
           ("psnr_db", "PSNR vs ref (dB)", "{:.2f}"), ("ssim", "SSIM vs ref", "{:.4f}"),
           ("psnr_vs_same_steps_cfg_db", "PSNR vs CFG same steps (dB)", "{:.2f}"),
           ("frechet", "Fréchet", "{:.4f}"))


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---|" + "---:|" * (len(COLUMNS) - 1)]
    for row in rows:
        cells = [("-" if row.get(key) is None else form.format(row[key]))
                 for key, _, form in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_name(opts: EvaluateConfig) -> str:
    threshold = f"_gamma{opts.gamma:g}" if opts.guidance in SWITCHING else ""
    if opts.cache is not Cache.none:
        threshold += f"_{opts.cache.value}_cache{opts.cache_threshold:g}"
    return (f"{opts.guidance.value}{threshold}_steps{opts.steps}_scale{opts.scale:g}"
            f"_ref{opts.reference_steps}_prompts{opts.prompts}_seed{opts.seed}")


def sampler_table(run, samplers: list[SamplerSpec], reference_steps: int, scale: float,
                  prompts: int, extractor, seed: int, batch: int, memory: PeakMemory) -> dict:
    """Every sampler's row against a full-CFG reference of ``reference_steps``, on the
    first ``prompts`` held-out captions and clips -> the table (run, step, labels, rows)."""
    rows = evaluate_samplers(run, samplers, SamplerSpec(Guidance.cfg, reference_steps, scale),
                             held_out_prompts(run.cfg.data, prompts),
                             held_out_clips(run.cfg.data, prompts), extractor, seed, batch,
                             memory)
    return {"run": str(run.run_dir), "step": run.step, "prompts": prompts, "seed": seed,
            "features": extractor.label, "memory": memory.label, "rows": rows}


def evaluate(opts: EvaluateConfig) -> dict:
    """Run the evaluation and write its table (on a mesh: rank 0); -> the table as written
    to JSON."""
    return evaluate_on_mesh(opts)[0]


def evaluate_on_mesh(opts: EvaluateConfig) -> tuple[dict, ParallelContext]:
    """``evaluate``, and this process's place in the sampling mesh."""
    check_split_guidance(opts.parallel, opts.guidance.value, opts.cache.value)
    run, sharding = load_on_mesh(opts.checkpoint, opts.parallel, opts.device, opts.ema)
    split_guidance(run.model.dit, sharding.ctx)
    if not isinstance(run.cfg.data, SyntheticDataConfig):
        raise ConfigError(f"checkpoint={opts.checkpoint} trained on "
                          f"{type(run.cfg.data).__name__}; trainer.evaluate judges the "
                          f"synthetic set and needs its held-out clips: evaluate a "
                          f"data=synthetic run")
    extractor = feature_extractor(opts.features, run.task.autoencoder)
    memory = PeakMemory(torch.device(opts.device))
    samplers = [SamplerSpec(Guidance.cfg, opts.steps, opts.scale)]
    if opts.guidance is not Guidance.cfg:
        linear = None
        if opts.guidance is Guidance.linear_ag:
            path = opts.linear_ag_file or calibration_path(run.run_dir, opts.steps, opts.scale)
            linear = load_coefficients(Path(path), run.model, opts.steps, opts.scale)
        samplers.append(SamplerSpec(opts.guidance, opts.steps, opts.scale, opts.gamma, linear))
    if opts.cache is not Cache.none:
        cache = sharding.cache(cache_settings(opts.cache, opts.cache_threshold, opts.guidance,
                                              run, opts.steps, opts.scale, opts.cache_file))
        samplers.append(SamplerSpec(opts.guidance, opts.steps, opts.scale, opts.gamma,
                                    cache=cache))
    table = sampler_table(run, samplers, opts.reference_steps, opts.scale, opts.prompts,
                          extractor, opts.seed, opts.batch, memory)
    # enums (guidance, cache, parallel.cp_mode) as their values
    table["options"] = json.loads(json.dumps(asdict(opts), default=lambda enum: enum.value))
    if not sharding.ctx.is_main:
        return table, sharding.ctx
    rows = table["rows"]
    output_dir = Path(opts.output_dir) if opts.output_dir else run.run_dir / "evaluation"
    output_dir.mkdir(parents=True, exist_ok=True)
    name = table_name(opts)
    (output_dir / f"{name}.json").write_text(json.dumps(table, indent=1))
    (output_dir / f"{name}.md").write_text(describe(table) + "\n\n" + markdown_table(rows) + "\n")
    mode = opts.wandb or run.cfg.trainer.wandb.mode.value
    if mode != "disabled":
        log_to_wandb(table, name, run, output_dir, mode)
    return table, sharding.ctx


def describe(table: dict) -> str:
    return (f"Evaluation of {table['run']} at step {table['step']}: {table['prompts']} held-out "
            f"prompts, seed {table['seed']}. Fréchet distance to the real held-out clips on "
            f"{table['features']}. Peak memory: {table['memory']}.")


def log_to_wandb(table: dict, name: str, run: TrainedRun, output_dir: Path, mode: str) -> None:
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    columns = [key for key, _, _ in COLUMNS]
    with wandb.init(project=run.cfg.trainer.wandb.project, entity=run.cfg.trainer.wandb.entity,
                    name=f"evaluate {run.run_dir.name} {name}", job_type="evaluate",
                    dir=str(output_dir), mode=mode, config=table["options"]) as wandb_run:
        wandb_run.log({"evaluation": wandb.Table(
            columns=columns, data=[[row.get(key) for key in columns] for row in table["rows"]])})
        wandb_run.summary.update({"features": table["features"], "memory": table["memory"]})


def main(argv: list[str]) -> None:
    try:
        opts = parse_cli_options(EvaluateConfig, argv, "trainer.evaluate",
                                 "checkpoint=<run dir> [guidance=cfg|adaptive|linear_ag|none "
                                 "gamma=0.99 cache=none|block|first_block|teacache "
                                 "cache_threshold=0.1 steps=25 scale=5 prompts=48 ...]")
        table, mesh = evaluate_on_mesh(opts)
    except ConfigError as error:
        raise SystemExit(f"config error: {error}") from None
    shutdown(mesh)
    if not mesh.is_main:
        return
    print(describe(table) + "\n\n" + markdown_table(table["rows"]))


if __name__ == "__main__":
    main(sys.argv[1:])
