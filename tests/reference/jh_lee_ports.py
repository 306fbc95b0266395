"""Test-side shims and drivers shared by ``test_l2p.py`` and ``test_dualprompt.py``.

JH-LEE-KR's l2p-pytorch and dualprompt-pytorch (``shared/refs/l2p-pytorch``,
``shared/refs/dualprompt-pytorch``) have one layout: ``vision_transformer.py`` built on timm
0.6.7's helpers, ``engine.py`` (``train_one_epoch``, ``evaluate``, ``train_and_evaluate``),
``configs/*.py`` (argparse defaults: the published settings) and ``datasets.py`` (transforms,
loaders). This module gives them what their imports ask for, from the test side:

* ``timm.models.layers`` / ``timm.models.helpers`` re-exported from timm 1.x, and a
  ``timm.models.registry`` whose ``register_model`` registers nothing (the ports re-register
  ``vit_base_patch16_224`` and friends, which would replace timm's own for the whole session);
* ``utils`` (their distributed/logging helpers, not published in the refs): a ``MetricLogger``
  that iterates and records every value it is given, so a test reads the official losses and
  accuracies;
* ``continual_datasets`` (dataset classes the tested path never builds): empty.

It also builds the official model the way their ``main.py`` does, copies a timm ViT's weights
into it (their pretrained loader's position-embedding expansion included), and runs clpeft's
strategy through the same experiences with the engine's own optimizer and step.
"""

from __future__ import annotations

import argparse
import importlib
import types
from collections import defaultdict

import timm.layers
import torch
from timm.models import _builder, _manipulate

from clpeft.data import Batch
from clpeft.experience import Experience
from clpeft.training import make_optimizer, optimizer_step


class _Meter:
    """Records every update; ``global_avg`` as the ports' ``SmoothedValue``."""

    def __init__(self, *args, **kwargs):
        self.values: list[float] = []
        self.total, self.count = 0.0, 0

    def update(self, value, n: int = 1) -> None:
        self.values.append(float(value))
        self.total += float(value) * n
        self.count += n

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)


class MetricLogger:
    """The ports' ``utils.MetricLogger``, reduced to iterating and recording (``MetricLogger.made``)."""

    made: list[MetricLogger] = []

    def __init__(self, delimiter: str = ""):
        self.meters: dict[str, _Meter] = defaultdict(_Meter)
        self.header = ""
        MetricLogger.made.append(self)

    def add_meter(self, name: str, meter: _Meter) -> None:
        self.meters[name] = meter

    def update(self, **values) -> None:
        for name, value in values.items():
            self.meters[name].update(value)

    def log_every(self, iterable, print_freq, header=None):
        self.header = header or ""
        yield from iterable

    def synchronize_between_processes(self) -> None:
        pass

    def __str__(self) -> str:
        return " ".join(f"{k}: {m.global_avg:.4f}" for k, m in self.meters.items())


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


def port_stubs() -> dict[str, types.ModuleType]:
    """Modules the ports import that timm 1.x moved or that the refs do not publish."""
    MetricLogger.made = []
    return {
        "timm.models.layers": _module(
            "timm.models.layers",
            PatchEmbed=timm.layers.PatchEmbed,
            Mlp=timm.layers.Mlp,
            DropPath=timm.layers.DropPath,
            trunc_normal_=timm.layers.trunc_normal_,
            lecun_normal_=timm.layers.lecun_normal_,
        ),
        "timm.models.helpers": _module(
            "timm.models.helpers",
            build_model_with_cfg=_builder.build_model_with_cfg,
            resolve_pretrained_cfg=_builder.resolve_pretrained_cfg,
            named_apply=_manipulate.named_apply,
            adapt_input_conv=_manipulate.adapt_input_conv,
            checkpoint_seq=_manipulate.checkpoint_seq,
        ),
        "timm.models.registry": _module("timm.models.registry", register_model=lambda fn: fn),
        "utils": _module("utils", MetricLogger=MetricLogger, SmoothedValue=_Meter, get_world_size=lambda: 1, is_main_process=lambda: True),
        "continual_datasets": _module("continual_datasets", __path__=[]),
        "continual_datasets.continual_datasets": _module("continual_datasets.continual_datasets"),
    }


def official_args(config: str, **overrides) -> argparse.Namespace:
    """The defaults of a port's ``configs/<config>.py``, as ``main.py`` parses them (call inside ``load_reference``)."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="subparser_name")
    importlib.import_module(f"configs.{config}").get_args_parser(sub.add_parser(config))
    args = parser.parse_args([config])
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


def scale_lr(args: argparse.Namespace) -> argparse.Namespace:
    """``main.py``: ``lr * batch_size / 256`` (one process, ``unscale_lr``), before ``create_optimizer``."""
    args.lr = args.lr * args.batch_size / 256.0
    return args


def official_model(vision_transformer: types.ModuleType, timm_vit, args: argparse.Namespace, prompted: bool, **extra) -> torch.nn.Module:
    """The port's ``VisionTransformer`` as ``main.py`` creates it (``model`` or ``original_model``),
    with ``timm_vit``'s weights. A position embedding of another length goes through the port's
    ``resize_pos_embed`` as its pretrained loader does (L2P: [CLS]'s position repeated over the
    prompt positions)."""
    grid = timm_vit.patch_embed.grid_size
    shape = dict(
        img_size=grid[0] * timm_vit.patch_embed.patch_size[0],
        patch_size=timm_vit.patch_embed.patch_size[0],
        embed_dim=timm_vit.embed_dim,
        depth=len(timm_vit.blocks),
        num_heads=timm_vit.blocks[0].attn.num_heads,
        mlp_ratio=timm_vit.blocks[0].mlp.fc1.out_features / timm_vit.embed_dim,
        num_classes=args.nb_classes,
    )
    prompt_args = (
        dict(
            prompt_length=args.length,
            embedding_key=args.embedding_key,
            prompt_init=args.prompt_key_init,
            prompt_pool=args.prompt_pool,
            prompt_key=args.prompt_key,
            pool_size=args.size,
            top_k=args.top_k,
            batchwise_prompt=args.batchwise_prompt,
            prompt_key_init=args.prompt_key_init,
            head_type=args.head_type,
            use_prompt_mask=args.use_prompt_mask,
            **extra,
        )
        if prompted
        else {}
    )
    model = vision_transformer.VisionTransformer(**shape, **prompt_args)
    weights = {k: v for k, v in timm_vit.state_dict().items()}
    if weights["pos_embed"].shape != model.pos_embed.shape:  # as the port's _load_weights
        weights["pos_embed"] = vision_transformer.resize_pos_embed(weights["pos_embed"], model.pos_embed, 1, grid)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.startswith(("head.", "prompt.", "e_prompt.", "g_prompt")) for k in missing), missing
    return model


def freeze_as_official(model: torch.nn.Module, original: torch.nn.Module, args: argparse.Namespace) -> None:
    """``main.py``'s freezing: all of ``original_model``, ``args.freeze`` prefixes of ``model``."""
    for p in original.parameters():
        p.requires_grad = False
    for n, p in model.named_parameters():
        if n.startswith(tuple(args.freeze)):
            p.requires_grad = False


def capture_logits(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every output of ``model.head`` from now on (the official logits before any mask)."""
    seen: list[torch.Tensor] = []
    model.head.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    return seen


def task_stream(class_mask: list[list[int]]) -> list[Experience]:
    """clpeft experiences for the ports' ``class_mask`` (classes of each task)."""
    seen: list[int] = []
    stream = []
    for t, classes in enumerate(class_mask):
        seen = seen + list(classes)
        stream.append(Experience(t, None, None, list(classes), list(seen)))
    return stream


def train_clpeft(strategy, stream: list[Experience], loaders: list[dict], train_cfg, epochs: int) -> list[float]:
    """clpeft's hooks over the ports' loaders: ``before_experience``, the engine's optimizer rebuilt per
    experience, ``training_step`` on the cached query, the engine's ``optimizer_step``,
    ``after_experience``. Returns every step's loss."""
    losses = []
    for exp, loader in zip(stream, loaders):
        strategy.before_experience(exp)
        strategy.train()
        optimizer = make_optimizer(strategy.param_groups(train_cfg.lr), train_cfg)
        for _ in range(epochs):
            for x, y in loader["train"]:
                with torch.no_grad():
                    query = strategy.backbone(x)
                loss = strategy.training_step(Batch(x, y, query))
                losses.append(loss.item())
                optimizer_step(optimizer, loss, train_cfg.clip_grad)
        strategy.eval()
        strategy.after_experience(exp)
    return losses


def official_losses() -> list[float]:
    """Every training-step loss the port's ``train_one_epoch`` logged so far."""
    return [v for logger in MetricLogger.made if logger.header.startswith("Train") for v in logger.meters["Loss"].values]


def official_accuracies() -> list[tuple[str, float]]:
    """``(header, Acc@1)`` of every ``evaluate`` call so far."""
    return [(logger.header, logger.meters["Acc@1"].global_avg) for logger in MetricLogger.made if logger.header.startswith("Test")]
