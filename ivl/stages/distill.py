"""Stage I: distillation from the Qwen2.5-VL teacher into the hybrid student.

Phase "layerwise": each Gated DeltaNet block of the student gets the teacher's input hidden states of that layer
and learns, by MSE (averaged over layers, scaled by ``mse_scale``), to reproduce the teacher layer's output; only
GDN parameters train. Phase "end_to_end": KL(teacher || student) of next-token distributions at temperature T
(scaled by T^2) on real tokens, optionally mixed with cross-entropy on labels. The first ``layerwise_steps``
optimizer steps are layer-wise, the rest end-to-end (``layerwise_steps=-1``: layer-wise only), so both phases run
in one fit or as two (the second from the first's exported student, with layerwise_steps=0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ivl.stages.base import StageModule, answer_loss_and_accuracy
from ivl.stages.models import load_student, load_teacher

KL_CHUNK = 1024  # positions per chunk of the [positions, vocab] logits


class DistillModule(StageModule):
    def __init__(self, teacher: str = "tiny", layerwise_steps: int = -1, temperature: float = 2.0,
                 ce_weight: float = 0.0, mse_scale: float = 1000.0, teacher_dtype: str | None = None, **kwargs):
        super().__init__(teacher=teacher, **kwargs)
        self.save_hyperparameters()
        self.gdn_layers = [i for i, kind in enumerate(self.model.config.text.layer_types) if kind != "attention"]
        if not self.gdn_layers:
            raise ValueError("the student has no Gated DeltaNet layer to distil into")

    def build_student(self):
        h = self.hparams
        # Kept out of the module tree: the frozen teacher must not land in checkpoints or the optimiser.
        self.__dict__["teacher"] = load_teacher(h.teacher, h.get("teacher_dtype"), seed=h.seed)
        return load_student(h.student, self.teacher, h.hybrid_ratio, h.window, h.gdn_init, h.seed)

    @property
    def default_trainable(self) -> tuple[str, ...]:
        gdn = "|".join(str(i) for i, kind in enumerate(self.model.config.text.layer_types) if kind != "attention")
        return (rf"lm\.layers\.({gdn})\.mixer\..*",)

    def phase(self) -> str:
        steps = self.hparams.layerwise_steps
        return "layerwise" if steps < 0 or self.global_step < steps else "end_to_end"

    def on_fit_start(self) -> None:
        self.teacher.to(self.device)

    def training_step(self, batch: dict, batch_idx: int):
        if "cu_seqlens" in batch:
            raise ValueError("distillation runs the transformers teacher, which takes padded batches: set the "
                             "DataModule's pack_tokens to null")
        phase = self.phase()
        loss = self.layerwise_loss(batch) if phase == "layerwise" else self.end_to_end_loss(batch)
        self.log("train/phase_end_to_end", float(phase == "end_to_end"), batch_size=1)
        self.log_tokens(batch, loss)
        return loss

    def validation_step(self, batch: dict, batch_idx: int):
        loss, correct = answer_loss_and_accuracy(self.model, batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=max(1, len(correct)))

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
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                        "pixel_values_videos", "video_grid_thw", "second_per_grid_ts") if k in batch}
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
        _, captured = self.teacher_forward(batch, self.gdn_layers)
        mask = batch.get("attention_mask")
        weight = mask[..., None].float() if mask is not None else None
        losses = []
        for i in self.gdn_layers:
            x, target = captured[i]
            block = self.model.lm.layers[i]
            dtype = block.mlp_norm.weight.dtype
            out = block(x.to(dtype), rope=None, attention_mask=mask)
            err = (out.float() - target.float()).pow(2)
            layer_loss = err.mean() if weight is None else (err * weight).sum() / (weight.sum() * err.shape[-1])
            self.log(f"train/mse_layer_{i}", layer_loss, batch_size=1)
            losses.append(layer_loss)
        return self.hparams.mse_scale * torch.stack(losses).mean()

    def end_to_end_loss(self, batch: dict) -> torch.Tensor:
        teacher_hidden, _ = self.teacher_forward(batch)
        student_hidden = self.model.hidden_states(**self.model_inputs(batch))
        mask = batch.get("attention_mask")
        valid = mask.bool() if mask is not None else torch.ones(student_hidden.shape[:2], dtype=torch.bool,
                                                               device=student_hidden.device)
        s, t = student_hidden[valid], teacher_hidden[valid]
        T = self.hparams.temperature
        total = s.new_zeros((), dtype=torch.float32)
        for a in range(0, len(s), KL_CHUNK):
            student_logp = F.log_softmax(self.model.lm.lm_head(s[a:a + KL_CHUNK]).float() / T, dim=-1)
            teacher_logp = F.log_softmax(self.teacher.lm_head(t[a:a + KL_CHUNK]).float() / T, dim=-1)
            total = total + F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum")
        kl = total / max(1, len(s)) * T * T
        self.log("train/kl", kl, batch_size=1)
        if self.hparams.ce_weight > 0 and "labels" in batch:
            ce, _ = answer_loss_and_accuracy(self.model, batch)
            self.log("train/ce", ce, batch_size=1)
            return kl + self.hparams.ce_weight * ce
        return kl
