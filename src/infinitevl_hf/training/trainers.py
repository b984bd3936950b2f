"""Distillation and fine-tuning of InfiniteVL with `transformers.Trainer` (so accelerate, DDP, FSDP and DeepSpeed,
bf16, gradient checkpointing, checkpoints and resuming all come from the Trainer).

The three stages of the InfiniteVL recipe:

* `LayerDistillationTrainer` (stage 1): every Gated DeltaNet (GDN) layer learns to reproduce the attention layer
  of the teacher it replaced. Forward hooks on the teacher capture, per layer, the token mixer's input (the
  normalised hidden states) and output (`self_attn` after `o_proj`). The student's GDN mixers are fed the
  TEACHER's inputs through forward pre-hooks, and the loss is the sum over GDN layers of the mean squared error
  between the student's and the teacher's mixer outputs (padding excluded), times `mse_scale`. The student runs
  through its ordinary `forward` (zero embeddings, one logit kept), so DDP/FSDP wrappers see a normal call.
* `LogitDistillationTrainer` (stage 2): KL(teacher || student) of the next-token distributions at temperature T,
  times T^2, averaged over non-padding tokens.
* `SFTTrainer` (stage 3): next-token cross-entropy on the assistant tokens (labels -100 elsewhere).

Which parameters train is chosen by `select_trainable` (see `TRAINABLE_PRESETS`). The defaults follow the
official release (hustvl/InfiniteVL `examples/train_linear/*.yaml`, LLaMA-Factory `finetuning_type: customize`):
its stage 1 and stage 2 train only the GDN token-mixer parameters (`q/k/v_proj`, `q/k/v_conv1d`, `g_proj`,
`a_proj`, `b_proj`, `A_log`, `dt_bias`, `o_norm`, `o_proj` of the non-attention layers) and freeze the vision
tower, the kept attention layers, the MLPs, the norms and the embeddings; its SFT trains the token mixers of
every layer (the attention layers' q/k/v/o projections too) with the vision tower, MLPs and embeddings frozen.
We keep those defaults (`"gdn"`, `"gdn"`, `"mixers"`): in stage 1 nothing else can learn anyway (the loss only
sees GDN mixer outputs), in stage 2 it keeps the distillation from disturbing the teacher's knowledge held in
the MLPs and the attention layers, and it is the recipe the published weights were trained with.

Packed rows (`cu_seqlens`, see `ConversationCollator(pack=True)`) go to the student as one row; the teacher
(a stock Qwen2.5-VL, which has no packed path on CPU) runs each sample alone and its outputs are concatenated.
"""

from __future__ import annotations

import contextlib

import logging
import re

import torch
import torch.nn.functional as F
from transformers import Trainer

from .data import IGNORE_INDEX, split_packed

logger = logging.getLogger(__name__)

TEXT_LAYER_PREFIX = "model.language_model.layers."
# Named parameter selections; anything else given to `select_trainable` is a comma-separated list of regexes.
TRAINABLE_PRESETS = ("gdn", "mixers", "language_model", "all", "none")
STAGE_DEFAULT_TRAINABLE = {"stage1": "gdn", "stage2": "gdn", "sft": "mixers"}
# LoRA targets (PEFT, stage 3): the decoder's token mixers and MLPs, not the vision tower (whose MLP uses the
# same gate/up/down names). Attention layers: q_proj, k_proj, v_proj, o_proj; GDN layers: q_proj, k_proj,
# v_proj, g_proj, o_proj (a_proj/b_proj are num_heads wide, too small for a low-rank update); MLP: gate_proj,
# up_proj, down_proj.
LORA_TARGET_MODULES = (
    r".*language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|g_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
)


def _base(model):
    """The InfiniteVL model under PEFT / DDP wrappers."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def gdn_layer_indices(model) -> list[int]:
    types = _base(model).config.get_text_config().layer_types
    return [i for i, kind in enumerate(types) if kind == "linear_attention"]


def select_trainable(model, spec: str) -> list[str]:
    """Set `requires_grad` on `model`'s parameters by `spec` and return the trainable names.

    spec: `"gdn"` (token mixers of the Gated DeltaNet layers), `"mixers"` (token mixers of every decoder layer),
    `"language_model"` (the whole decoder, embeddings and lm_head included), `"all"`, `"none"`, or a
    comma-separated list of regexes searched in the parameter names (e.g. `"layers\\.\\d+\\.self_attn,lm_head"`).
    Raises ValueError when a non-empty selection matches nothing.
    """
    gdn = gdn_layer_indices(model)
    if spec == "gdn":
        patterns = [rf"^{re.escape(TEXT_LAYER_PREFIX)}({'|'.join(map(str, gdn))})\.self_attn\."] if gdn else []
    elif spec == "mixers":
        patterns = [rf"^{re.escape(TEXT_LAYER_PREFIX)}\d+\.self_attn\."]
    elif spec == "language_model":
        patterns = [r"^model\.language_model\.", r"^lm_head\."]
    elif spec == "all":
        patterns = [r""]
    elif spec == "none":
        patterns = []
    else:
        patterns = [p.strip() for p in spec.split(",") if p.strip()]
        for pattern in patterns:
            re.compile(pattern)
    compiled = [re.compile(p) for p in patterns]
    names = []
    for name, param in model.named_parameters():
        train = any(p.search(name) for p in compiled)
        param.requires_grad_(train)
        if train:
            names.append(name)
    if patterns and not names:
        raise ValueError(f"The trainable-parameter selection {spec!r} matches no parameter of the model.")
    logger.info("Training %d parameter tensors (%s).", len(names), spec)
    return names


def apply_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules: str = LORA_TARGET_MODULES):
    """Wrap `model` with PEFT LoRA adapters on `target_modules` (default: decoder mixers and MLPs, see
    `LORA_TARGET_MODULES`); only the adapters train. Needs `pip install peft` (extra `train`)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError("LoRA needs PEFT: pip install 'infinitevl-hf[train]' (or pip install peft).") from error
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def teacher_layers(teacher):
    """Decoder layers of a Qwen2.5-VL (or InfiniteVL) teacher."""
    inner = getattr(teacher, "model", teacher)
    language_model = getattr(inner, "language_model", inner)
    if not hasattr(language_model, "layers"):
        raise ValueError(f"Cannot find the decoder layers of the teacher {type(teacher).__name__}.")
    return language_model.layers


def _teacher_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw") if k in batch}


class TeacherCapture:
    """Forward hooks on the teacher's token mixers (`layers[i].self_attn`) recording, per call, the mixer input and
    output of the layers in `indices`. `take(i)` concatenates the calls along the sequence (packed samples)."""

    def __init__(self, teacher, indices):
        self.inputs = {i: [] for i in indices}
        self.outputs = {i: [] for i in indices}
        self.handles = []
        self.active = False  # record only inside `recording()`: other teacher forwards keep nothing
        layers = teacher_layers(teacher)
        for i in indices:
            self.handles.append(layers[i].self_attn.register_forward_hook(self._hook(i), with_kwargs=True))

    def _hook(self, i):
        def hook(module, args, kwargs, output):
            if not self.active:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            self.inputs[i].append(hidden.detach())
            self.outputs[i].append((output[0] if isinstance(output, tuple) else output).detach())

        return hook

    def clear(self):
        for store in (self.inputs, self.outputs):
            for parts in store.values():
                parts.clear()

    @contextlib.contextmanager
    def recording(self):
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def take(self, i) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.inputs[i], dim=1), torch.cat(self.outputs[i], dim=1)

    def remove(self):
        for handle in self.handles:
            handle.remove()


class _DistillationMixin:
    """Common set-up: the trainable selection, the frozen teacher on the training device, packed teacher runs."""

    def _setup(self, model, teacher, trainable):
        if trainable is not None:
            select_trainable(model, trainable)
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)

    def _place_teacher(self):
        if self.teacher is not None:
            self.teacher.to(self.args.device)

    @torch.no_grad()
    def teacher_logits(self, inputs: dict, **kwargs) -> torch.Tensor | None:
        """Run the teacher on `inputs` (each packed sample alone); returns its logits [B, T, V] (concatenated)."""
        if "cu_seqlens" in inputs:
            config = _base(self.model).config
            samples = split_packed(inputs, config.image_token_id, config.vision_config.spatial_merge_size)
            return torch.cat([self.teacher(**_teacher_inputs(s), **kwargs).logits for s in samples], dim=1)
        return self.teacher(**_teacher_inputs(inputs), **kwargs).logits


def _valid_mask(inputs: dict, like: torch.Tensor) -> torch.Tensor:
    mask = inputs.get("attention_mask")
    return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device) if mask is None else mask.bool()


class LayerDistillationTrainer(_DistillationMixin, Trainer):
    """Stage 1: per-layer MSE between the student's GDN mixer outputs and the teacher's attention outputs, the
    student's mixers being fed the teacher's mixer inputs. See the module docstring.

    Args:
        model: the converted `InfiniteVLForConditionalGeneration` (student).
        teacher: the Qwen2.5-VL model it was converted from (frozen, moved to the training device).
        trainable: `select_trainable` spec (default `"gdn"`; None leaves `requires_grad` as it is).
        mse_scale: factor on the summed layer MSE (the official release uses the mean over layers times 1000).
        **kwargs: `transformers.Trainer` arguments (`args`, `train_dataset`, `data_collator`, ...).
    """

    def __init__(self, model=None, teacher=None, trainable: str | None = "gdn", mse_scale: float = 1.0, **kwargs):
        if teacher is None:
            raise ValueError("Layer distillation needs a teacher model.")
        self._setup(model, teacher, trainable)
        super().__init__(model=model, **kwargs)
        self._place_teacher()
        self.mse_scale = mse_scale
        self.layers = gdn_layer_indices(model)
        if not self.layers:
            raise ValueError("The student has no Gated DeltaNet layer to distil.")
        self.capture = TeacherCapture(teacher, self.layers)
        self._feed: dict[int, torch.Tensor] = {}
        self._student_out: dict[int, torch.Tensor] = {}
        student_layers = _base(model).model.language_model.layers
        self._student_hooks = []
        for i in self.layers:
            mixer = student_layers[i].self_attn
            self._student_hooks.append(mixer.register_forward_pre_hook(self._feed_hook(i), with_kwargs=True))
            self._student_hooks.append(mixer.register_forward_hook(self._output_hook(i)))

    def remove_hooks(self) -> None:
        """Detach every hook this trainer put on the teacher and the student (call when done with the trainer)."""
        self.capture.remove()
        for handle in self._student_hooks:
            handle.remove()
        self._student_hooks = []

    def _feed_hook(self, i):
        def hook(module, args, kwargs):
            if i not in self._feed:
                return None
            fed = self._feed[i].to(args[0].dtype if args else kwargs["hidden_states"].dtype)
            if args:
                return (fed, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fed}

        return hook

    def _output_hook(self, i):
        def hook(module, args, output):
            if i in self._feed:
                self._student_out[i] = output

        return hook

    def layer_losses(self, model, inputs: dict) -> dict[int, torch.Tensor]:
        """Mean squared error of every GDN layer's mixer output against the teacher's attention output."""
        self.capture.clear()
        with torch.no_grad(), self.capture.recording():
            self.teacher_logits(inputs, logits_to_keep=1)  # only the layer activations are needed
        self._feed = {i: self.capture.take(i)[0] for i in self.layers}
        self._student_out = {}
        try:
            ids = inputs["input_ids"]
            hidden = _base(model).config.get_text_config().hidden_size
            dtype = next(iter(self._feed.values())).dtype
            embeds = torch.zeros(*ids.shape, hidden, dtype=dtype, device=ids.device)
            extra = {k: inputs[k] for k in ("attention_mask", "cu_seqlens") if k in inputs}
            model(inputs_embeds=embeds, logits_to_keep=1, use_cache=False, **extra)
            losses = {}
            valid = _valid_mask(inputs, ids)[..., None].float()
            count = valid.sum() * hidden
            for i in self.layers:
                target = self.capture.take(i)[1].float()
                diff = (self._student_out[i].float() - target) * valid
                losses[i] = diff.pow(2).sum() / count
        finally:
            self._student_out = {}
            self.capture.clear()
            if not torch.is_grad_enabled():
                self._feed = {}
        return losses

    def training_step(self, *args, **kwargs):
        # The teacher inputs stay fed until backward has run: gradient checkpointing re-runs the mixers there.
        try:
            return super().training_step(*args, **kwargs)
        finally:
            self._feed = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        losses = self.layer_losses(model, inputs)
        loss = torch.stack(list(losses.values())).sum() * self.mse_scale
        return (loss, {"layer_losses": losses}) if return_outputs else loss


class LogitDistillationTrainer(_DistillationMixin, Trainer):
    """Stage 2: `T^2 * KL(softmax(teacher / T) || softmax(student / T))` per token, averaged over non-padding tokens.

    Args:
        model: the student (after stage 1). teacher: the Qwen2.5-VL teacher (frozen).
        temperature: T (the official release uses 2).
        trainable: `select_trainable` spec (default `"gdn"`).
    """

    def __init__(self, model=None, teacher=None, temperature: float = 2.0, trainable: str | None = "gdn", **kwargs):
        if teacher is None:
            raise ValueError("Logit distillation needs a teacher model.")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        self._setup(model, teacher, trainable)
        super().__init__(model=model, **kwargs)
        self._place_teacher()
        self.temperature = temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher_logits = self.teacher_logits(inputs)
        student_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**student_inputs, use_cache=False)
        loss = distillation_kl(outputs.logits, teacher_logits, _valid_mask(inputs, inputs["input_ids"]), self.temperature)
        return (loss, outputs) if return_outputs else loss


def distillation_kl(student_logits, teacher_logits, valid, temperature: float) -> torch.Tensor:
    """`T^2 * mean over valid tokens of KL(softmax(teacher/T) || softmax(student/T))`; logits [B, T, V], valid [B, T]."""
    t = temperature
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    log_p_student = F.log_softmax(student_logits[..., :vocab].float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits[..., :vocab].float() / t, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    valid = valid.to(kl.device).float()
    return (kl * valid).sum() / valid.sum().clamp(min=1) * t * t


def next_token_loss(logits, labels, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of `logits[:, t]` against `labels[:, t + 1]` (-100 ignored)."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


class SFTTrainer(_DistillationMixin, Trainer):
    """Stage 3: next-token cross-entropy on the labelled (assistant) tokens, averaged over them.

    Args:
        model: the student, or a PEFT model from `apply_lora` (then pass `trainable=None`).
        trainable: `select_trainable` spec (default `"mixers"`; None leaves `requires_grad` as it is).
    """

    def __init__(self, model=None, trainable: str | None = "mixers", **kwargs):
        self._setup(model, None, trainable)
        super().__init__(model=model, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
        loss = next_token_loss(outputs.logits, labels)
        return (loss, outputs) if return_outputs else loss


__all__ = [
    "LORA_TARGET_MODULES",
    "STAGE_DEFAULT_TRAINABLE",
    "TRAINABLE_PRESETS",
    "LayerDistillationTrainer",
    "LogitDistillationTrainer",
    "SFTTrainer",
    "TeacherCapture",
    "apply_lora",
    "distillation_kl",
    "gdn_layer_indices",
    "next_token_loss",
    "select_trainable",
    "teacher_layers",
]
