"""SDTT: self-distillation through time for MDLM, the paper's "distilled discrete diffusion".

One round distils a masked-diffusion teacher sampled with N ancestral steps
(dt = 1/N) into a student of the same backbone, initialised from it, that takes
N/2 steps: at a state z_t the student's one prediction p_theta(x | z_t) must
match the teacher's distribution after two ancestral steps of size dt,

    z_t  --teacher, t-->  z_{t+dt}  --teacher, t+dt-->  z_{t+2dt},

target_l = the teacher's p(x_l | z) at the step that revealed token l, or at the
last step for tokens still masked after both; loss = sum over the masked tokens
of z_t of KL(target_l || p_theta(x_l | z_t)) (the "kl-fwd" objective of Deschenaux
& Gulcehre, 2024). Times t are stratified over the global batch on [0, 1 - 2 dt];
the teacher's reveals use each example's own generator (world-size invariant).

Rounds halve the step count (e.g. 1024 -> 512 -> ... -> 8): each round is a run
whose ``distill.teacher`` is the previous round's checkpoint and whose
``distill.teacher_steps`` is half the previous one's, so every round resumes
exactly and records its teacher in its provenance. The student samples with the
MDLM sampler (:func:`flm.methods.mdlm.mdlm_sample`), whatever the step count:
one step from all-masks still draws every position independently.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import torch
from torch import nn

from flm.config import Config
from flm.loading import fingerprint, load_frozen, model_config_of, read_config
from flm.methods.base import Batch, Fixed, LossOutput, no_options, stratified_times
from flm.methods.fmlm import init_student
from flm.methods.mdlm import mask_tokens, mdlm_sample, subs_log_probs

log = logging.getLogger("flm")


def _per_example_categorical(probs: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """Token ids (B, L), row b drawn from ``probs[b]`` (L, V) with ``gens[b]``."""
    return torch.stack([torch.multinomial(p.double(), 1, generator=g).squeeze(-1) for p, g in zip(probs, gens)])


@torch.no_grad()
def two_step_target(teacher: nn.Module, z: torch.Tensor, t: torch.Tensor, dt: float, mask_id: int,
                    gens: list[torch.Generator]) -> torch.Tensor:
    """The SDTT target log-probabilities (B, L, V) at the masked positions of ``z``: two
    ancestral teacher steps t -> t + dt -> t + 2 dt; each revealed token takes the teacher's
    log p(x | z) of the step that revealed it, tokens still masked those of the last step."""
    target = torch.zeros(*z.shape, teacher_vocab(teacher), device=z.device)
    current, time = z, t.double()
    for _ in range(2):
        logp = subs_log_probs(teacher(current, time.float()), current, mask_id)
        draw = _per_example_categorical(logp.exp(), gens)
        u = torch.stack([torch.rand(z.shape[1], generator=g, device=z.device, dtype=torch.float64) for g in gens])
        reveal_prob = (dt / (1.0 - time)).clamp(0.0, 1.0)[:, None]
        reveal = (current == mask_id) & (u < reveal_prob)
        target = torch.where(reveal[..., None], logp, target)
        current, time = torch.where(reveal, draw, current), time + dt
    still = (current == mask_id)[..., None]
    return torch.where(still, logp, target)


def teacher_vocab(model: nn.Module) -> int:
    """V of a backbone: the width of its output layer (the mask id is not an output)."""
    return model.final.linear.out_features


def sdtt_loss(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, t: torch.Tensor, dt: float,
              mask_id: int, gens: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sum over the masked positions of z_t of KL(target || p_theta(. | z_t)), and
    its per-example mean per token (detached)."""
    z = mask_tokens(ids, t, gens, mask_id)
    target = two_step_target(teacher, z, t, dt, mask_id, gens)
    logp = subs_log_probs(student(z, t), z, mask_id)
    masked = z == mask_id
    kl = (target.exp() * (target - logp)).sum(-1)
    kl = torch.where(masked, kl, 0.0)  # unmasked positions: SUBS carries them, nothing to learn
    return kl.sum(), kl.detach().mean(1)


class SDTT:
    """One SDTT round: MDLM student of a frozen MDLM (or earlier-round SDTT) teacher."""

    name: ClassVar[str] = "sdtt"
    bucket_label: ClassVar[str] = "loss_by_t/t"
    weighted: ClassVar[bool] = False
    any_steps: ClassVar[bool] = True
    cost = (2 + 3) / 3  # two teacher forwards (1 unit each) + one student forward/backward (3 units)

    def __init__(self, seq_len: int, vocab_size: int, teacher: nn.Module | None, teacher_steps: int,
                 provenance: dict[str, dict[str, str]]) -> None:
        self.seq_len, self.vocab_size, self.mask_id = seq_len, vocab_size, vocab_size
        self.teacher, self.teacher_steps, self.provenance = teacher, teacher_steps, provenance
        self.dense_input = False
        self.extra_modules: dict[str, nn.Module] = {}

    @classmethod
    def build(cls, cfg: Config, mesh: Any, device: torch.device) -> SDTT:
        d = cfg.distill
        if not d.teacher:
            raise ValueError("objective=sdtt needs distill.teacher (an MDLM or SDTT checkpoint)")
        kind = read_config(d.teacher).get("objective", "flm")
        if kind not in ("mdlm", "sdtt"):
            raise ValueError(f"distill.teacher={d.teacher} was trained with objective={kind!r}; "
                             "expected an MDLM (or an earlier SDTT round)")
        if d.teacher_steps < 2 or d.teacher_steps % 2:
            raise ValueError(f"distill.teacher_steps={d.teacher_steps}: expected an even number >= 2 "
                             "(the student takes half as many steps)")
        teacher_cfg = model_config_of(d.teacher)
        if (teacher_cfg.vocab_size, teacher_cfg.seq_len) != (cfg.model.vocab_size, cfg.model.seq_len):
            raise ValueError(f"distill.teacher has vocab_size={teacher_cfg.vocab_size}, seq_len="
                             f"{teacher_cfg.seq_len} but the config says model.vocab_size={cfg.model.vocab_size}, "
                             f"model.seq_len={cfg.model.seq_len}")
        cfg.model = dataclasses.replace(teacher_cfg, dropout=cfg.model.dropout)
        provenance = {"teacher": {"path": str(d.teacher), "fingerprint": fingerprint(d.teacher)}}
        teacher = load_frozen(d.teacher, mesh, cfg.dist.mixed_precision, device)
        log.info("SDTT round: teacher %s at %d steps -> student at %d", d.teacher, d.teacher_steps,
                 d.teacher_steps // 2)
        return cls(cfg.model.seq_len, cfg.model.vocab_size, teacher, d.teacher_steps, provenance)

    @classmethod
    def for_generation(cls, config: dict, device: torch.device, **options: Any) -> SDTT:
        no_options(cls.name, options)
        return cls(int(config["model"]["seq_len"]), int(config["model"]["vocab_size"]), None,
                   int(config.get("distill", {}).get("teacher_steps", 2)), {})

    def init_model(self, model: nn.Module) -> None:
        init_student(model, self.teacher, zero_output=False)  # the student starts as the teacher

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        dt = 1.0 / self.teacher_steps
        t = stratified_times(batch.num_global, batch.index, batch.shared, t_max=1.0 - 2 * dt)
        loss_sum, per_example = sdtt_loss(model, self.teacher, batch.ids, t, dt, self.mask_id, batch.gens)
        return LossOutput(loss_sum, loss_sum, per_example, t)

    def sample(self, model: nn.Module, num: int, steps: int, generator: torch.Generator,
               fixed: Fixed | None = None) -> tuple[torch.Tensor, int]:
        return mdlm_sample(model, num, self.seq_len, self.mask_id, steps, generator, fixed), steps

    def scalars(self, device: torch.device) -> dict[str, float]:
        return {}
