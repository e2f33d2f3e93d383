"""Stage I: distillation from the Qwen2.5-VL teacher into the hybrid student.

Phase "layerwise": each linear-mixer block of the student gets the teacher's input hidden states of that layer
and learns, by MSE (averaged over layers, scaled by ``mse_scale``), to reproduce the teacher layer's output.
Phase "end_to_end": KL(teacher || student) of next-token distributions at temperature T (scaled by T^2) on real
tokens, optionally mixed with cross-entropy on labels. The first ``layerwise_steps``
optimizer steps are layer-wise, the rest end-to-end (``layerwise_steps=-1``: layer-wise only), so both phases run
in one fit or as two (the second from the first's exported student, with layerwise_steps=0). Each phase trains
its own parameter set (``layerwise_trainable``, ``trainable``).
"""

from __future__ import annotations

import re

import torch
from torchmetrics.aggregation import MeanMetric

from ivl.stages import host_batch
from ivl.stages.base import MODEL_INPUTS, StageModule
from ivl.stages.flops import Flops, hybrid_batch_flops, transformer_batch_flops
from ivl.stages.models import load_teacher

PHASES = ("layerwise", "end_to_end")


class DistillModule(StageModule):
    """Args (besides ``StageModule``'s):
    teacher: the Qwen2.5-VL teacher, loaded on every process in ``teacher_dtype`` (bfloat16 by default for a
        folder: 7.5 GB at 3B, resident beside the sharded student) and frozen.
    layerwise_steps: optimizer steps of the layer-wise phase; -1: layer-wise only, 0: end-to-end only.
    temperature, ce_weight: the end-to-end phase's KL temperature and optional cross-entropy weight.
    mse_scale: the layer-wise MSE's scale.
    layerwise_trainable: what trains in the layer-wise phase (``trainable``'s syntax); ``trainable`` is what
        trains end to end. Both default to every linear-mixer parameter. The optimiser holds the union; each
        step only the current phase's parameters are updated.
    """

    default_trainable = (r"lm\.layers\.{linear}\.mixer\..*",)

    def __init__(
        self,
        teacher: str = "tiny",
        layerwise_steps: int = -1,
        temperature: float = 2.0,
        ce_weight: float = 0.0,
        mse_scale: float = 1000.0,
        teacher_dtype: str | None = None,
        layerwise_trainable: list[str] | None = None,
        **kwargs,
    ):
        super().__init__(teacher=teacher, **kwargs)
        self.save_hyperparameters()
        # Kept out of the module tree: the frozen teacher must not land in checkpoints, the optimiser or FSDP.
        self.__dict__["teacher"] = None
        self.linear_layers: list[int] = []
        self.phase_parameters: dict[str, set[str]] = {}
        # token-weighted means over the validation epoch, reduced across processes
        self.val_nll, self.val_teacher_nll, self.val_agreement, self.val_kl = (MeanMetric() for _ in range(4))

    def configure_model(self) -> None:
        if self.model is not None:
            return
        h = self.hparams
        if self.teacher is None:
            self.__dict__["teacher"] = load_teacher(h.teacher, h.get("teacher_dtype"), seed=h.seed)
        super().configure_model()
        self.linear_layers = self.model.config.text.linear_layers

    def conversion_teacher(self):
        return self.teacher

    def trainable_patterns(self) -> list[str]:
        if self.fitting() and not self.model.config.text.linear_layers:
            raise ValueError(
                "the student has no linear-mixer layer to distil into (hybrid_ratio 1 is all window "
                "attention: evaluate it with validate)"
            )
        layerwise = self.hparams.get("layerwise_trainable") or list(self.default_trainable)
        end_to_end = super().trainable_patterns()
        names = [n for n, _ in self.model.named_parameters()]
        for phase, patterns in zip(PHASES, (layerwise, end_to_end)):
            regex = [re.compile(self.expand(p)) for p in patterns]
            self.phase_parameters[phase] = {n for n in names if any(r.fullmatch(n) for r in regex)}
            if not self.phase_parameters[phase] and self.fitting():
                raise ValueError(f"no parameter matches the {phase} phase's trainable patterns {patterns}")
        return layerwise + end_to_end

    def phase(self) -> str:
        steps = self.hparams.layerwise_steps
        return "layerwise" if steps < 0 or self.global_step < steps else "end_to_end"

    def on_fit_start(self) -> None:
        self.teacher.to(self.device)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self._ran_phase = self.phase()  # flops_per_batch is read after the step, when the phase may have moved on

    def batch_flops(self, lengths: list[int]) -> Flops:
        """The student's (its linear-mixer blocks alone in the layer-wise phase) and the teacher's forward."""
        layerwise = self.training and getattr(self, "_ran_phase", None) == "layerwise"
        student = hybrid_batch_flops(self.model, lengths, self.linear_layers if layerwise else None, head=not layerwise)
        teacher = transformer_batch_flops(self.teacher, lengths, trained=False)
        return Flops(student.forward + teacher.forward, student.backward)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Only the current phase's parameters step (the optimiser holds both phases' parameters)."""
        keep = self.phase_parameters[self.phase()]
        for name, p in self.model.named_parameters():
            if name not in keep:
                p.grad = None

    def training_step(self, batch: dict, batch_idx: int):
        if "cu_seqlens" in batch:
            raise ValueError(
                "distillation runs the transformers teacher, which takes padded batches: set the "
                "DataModule's pack_tokens to null"
            )
        phase = self.phase()
        loss = self.layerwise_loss(batch) if phase == "layerwise" else self.end_to_end_loss(batch)
        self.log("train/phase_end_to_end", float(phase == "end_to_end"), batch_size=1)
        self.log_tokens(batch, loss)
        return loss

    def validation_step(self, batch: dict, batch_idx: int):
        """On the answers of held-out text: the student's and the teacher's cross-entropy, KL(teacher || student)
        at T = 1 over real tokens, and top-1 next-token agreement with the teacher. Epoch values are weighted by
        tokens (``on_validation_epoch_end``: val/ppl, val/teacher_ppl, val/kl_to_teacher, val/top1_agreement)."""
        teacher_hidden, _ = self.teacher_forward(batch)
        out = self.model.head_losses(
            labels=batch["labels"],
            teacher_hidden=teacher_hidden,
            teacher_head=self.teacher.lm_head.weight,
            temperature=1.0,
            compare_teacher=True,
            label_positions=batch.get("label_positions"),
            **self.model_inputs(batch),
        )
        answers = int((batch["labels"][:, 1:] != -100).sum())
        tokens = host_batch.count_tokens(batch)
        self.log("val/loss", out.ce, prog_bar=True, batch_size=max(1, len(out.correct)))
        zero = out.kl.detach().new_zeros(())  # every process updates every metric, so their reductions match
        self.val_nll.update(out.ce if answers else zero, answers)
        self.val_teacher_nll.update(out.teacher_ce if answers else zero, answers)
        self.val_agreement.update(out.agreement if answers else zero, answers)
        self.val_kl.update(out.kl, tokens)

    def on_validation_epoch_end(self) -> None:
        if self.val_kl.update_count == 0:  # no validation batch (the same on every process)
            return
        nll, teacher_nll = self.val_nll.compute(), self.val_teacher_nll.compute()
        agreement = self.val_agreement.compute()
        if torch.isfinite(nll):  # NaN: no answer token anywhere
            self.log("val/ppl", nll.exp())
            self.log("val/teacher_ppl", teacher_nll.exp())
            self.log("val/top1_agreement", agreement)
        self.log("val/kl_to_teacher", self.val_kl.compute())
        for metric in (self.val_nll, self.val_teacher_nll, self.val_agreement, self.val_kl):
            metric.reset()

    # ---- teacher ---------------------------------------------------------------------------------------------
    def _teacher_layers(self):
        inner = self.teacher.model
        return (inner.language_model if hasattr(inner, "language_model") else inner).layers

    @torch.no_grad()
    def teacher_forward(self, batch: dict, capture_layers: list[int] = ()) -> tuple[torch.Tensor, dict]:
        """Final normed hidden states [B, T, hidden] and, per captured layer, (input, output) hidden states."""
        captured, hooks = {}, []
        layers = self._teacher_layers()
        for i in capture_layers:

            def hook(module, args, kwargs, output, i=i):
                x = args[0] if args else kwargs["hidden_states"]
                captured[i] = (x, output[0] if isinstance(output, tuple) else output)

            hooks.append(layers[i].register_forward_hook(hook, with_kwargs=True))
        ids = batch["input_ids"]
        # transformers' teacher takes the student's inputs except packed boundaries (it is never run packed).
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch and k != "cu_seqlens"}
        config = self.teacher.config
        inputs["mm_token_type_ids"] = (ids == config.image_token_id).int() + 2 * (ids == config.video_token_id).int()
        try:
            out = self.teacher.model(**inputs)
        finally:
            for h in hooks:
                h.remove()
        return out.last_hidden_state, captured

    # ---- losses ----------------------------------------------------------------------------------------------
    def layerwise_loss(self, batch: dict) -> torch.Tensor:
        _, captured = self.teacher_forward(batch, self.linear_layers)
        mask = batch.get("attention_mask")
        weight = mask[..., None].float() if mask is not None else None
        # Under FSDP2 the blocks cast their inputs to their compute dtype themselves.
        dtype = None if self.sharded else self.model.lm.norm.weight.dtype
        inputs = {i: captured[i][0] if dtype is None else captured[i][0].to(dtype) for i in self.linear_layers}
        outputs = self.model.block_outputs(inputs, mask)
        losses = []
        for i in self.linear_layers:
            err = (outputs[i].float() - captured[i][1].float()).pow(2)
            layer_loss = err.mean() if weight is None else (err * weight).sum() / (weight.sum() * err.shape[-1])
            self.log(f"train/mse_layer_{i}", layer_loss, batch_size=1)
            losses.append(layer_loss)
        return self.hparams.mse_scale * torch.stack(losses).mean()

    def end_to_end_loss(self, batch: dict) -> torch.Tensor:
        """KL to the teacher at temperature T over real tokens (chunked over the vocabulary: never a [tokens, vocab]
        float32 tensor), plus ``ce_weight`` x the answers' cross-entropy when the batch has labels."""
        teacher_hidden, _ = self.teacher_forward(batch)
        with_ce = self.hparams.ce_weight > 0 and "labels" in batch
        out = self.model.head_losses(
            labels=batch["labels"] if with_ce else None,
            teacher_hidden=teacher_hidden,
            teacher_head=self.teacher.lm_head.weight,
            temperature=self.hparams.temperature,
            label_positions=batch.get("label_positions") if with_ce else None,
            **self.model_inputs(batch),
        )
        self.log("train/kl", out.kl, batch_size=1)
        if with_ce:
            self.log("train/ce", out.ce, batch_size=1)
            return out.kl + self.hparams.ce_weight * out.ce
        return out.kl
