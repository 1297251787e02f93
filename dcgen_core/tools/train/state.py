"""Training checkpoints: safetensors + JSON only (no pickles).

A checkpoint is a folder ``<out>/checkpoints/step-00000100/`` holding

* ``model.safetensors``: every trained tensor (``param.<name>``) and its EMA (``ema.<name>``);
* ``state.safetensors``: AdamW moments (``optim.<i>.<key>``), the torch CPU/CUDA RNG states and the batch
  sampler's generator and permutation;
* ``state.json``: step, stage, parameter order and shapes, optimizer hyper-parameters, sampler position and the
  run's structure (what must match to resume).

It is written into a temporary folder and renamed, so an interrupted save never leaves a half checkpoint. Under FSDP
the shards are gathered into whole tensors (the same format), and loading cuts them into this process's shards.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from ...shared.checkpoints import read_json
from ...shared.errors import DCGenError
from .fsdp import gather_full, is_sharded, like

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
FORMAT = "dcgen-train-checkpoint"
VERSION = 1


def _contiguous(sd: dict, keep: bool = True) -> dict:
    """Whole CPU tensors (FSDP shards gathered; ``keep`` False: gathered for the writer, {} returned)."""
    return gather_full(sd, keep)


class LoadedCheckpoint:
    def __init__(self, path: str):
        self.path = path
        info_path = os.path.join(path, "state.json")
        self.info = read_json(info_path, "a training checkpoint's state.json")
        if self.info.get("format") != FORMAT:
            raise DCGenError(f"{info_path}: expected a {FORMAT} state.json, found format "
                             f"{self.info.get('format')!r}.")
        self.model = load_file(os.path.join(path, "model.safetensors"))
        self.state = load_file(os.path.join(path, "state.safetensors"))
        self.step = int(self.info["step"])
        self.stage = self.info["stage"]

    def check_structure(self, structure: dict):
        saved = self.info.get("structure", {})
        diff = {k: (saved.get(k), v) for k, v in structure.items() if saved.get(k) != v}
        if diff:
            shown = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise DCGenError(f"{self.path}: expected a checkpoint of the same training setup, found differences "
                             f"({shown}). Resume with the options it was started with.")

    def load_params(self, params: dict):
        """Copy every saved ``param.<name>`` into ``params`` (the names must match exactly)."""
        saved = {k[len("param."):] for k in self.model if k.startswith("param.")}
        if saved != set(params):
            missing, extra = sorted(set(params) - saved), sorted(saved - set(params))
            raise DCGenError(f"{self.path}: expected the trained tensors of this run, found missing {missing[:4]}, "
                             f"unexpected {extra[:4]}.")
        with torch.no_grad():
            for k, p in params.items():
                src = self.model[f"param.{k}"]
                if tuple(src.shape) != tuple(p.shape):
                    raise DCGenError(f"{self.path}: expected '{k}' of shape {list(p.shape)}, found "
                                     f"{list(src.shape)}.")
                p.copy_(like(src.to(p.dtype), p))  # FSDP: this process's shard of the whole tensor

    def restore(self, optimizer, sampler, ema, params: dict) -> int:
        """Optimizer moments, sampler, EMA and RNG states of the stage; returns the step to continue from."""
        names = self.info["optimizer"]["params"]
        if names != list(params):
            raise DCGenError(f"{self.path}: expected optimizer state for {len(params)} tensors in this run's order, "
                             f"found {len(names)}.")
        state: dict[int, dict] = {}
        for key, value in self.state.items():
            m = re.match(r"^optim\.(\d+)\.(.+)$", key)
            if m:
                state.setdefault(int(m[1]), {})[m[2]] = value
        for i, scalars in self.info["optimizer"].get("scalars", {}).items():
            state.setdefault(int(i), {}).update(scalars)
        plist = list(params.values())
        for i, st in state.items():
            if i < len(plist) and is_sharded(plist[i]):
                st.update({k: like(v, plist[i]) for k, v in st.items() if torch.is_tensor(v) and k != "step"})
        optimizer.load_state_dict({"state": state, "param_groups": self.info["optimizer"]["param_groups"]})
        sampler.load_state(self.state, self.info["sampler"], self.path)
        if ema is not None:
            for k, p in params.items():
                if f"ema.{k}" not in self.model:
                    raise DCGenError(f"{self.path}: expected an EMA of '{k}' (the run uses --ema-decay), found "
                                     "none. Resume with the --ema-decay it was started with.")
                ema.shadow[k] = like(self.model[f"ema.{k}"].float().clone(), p)
        torch.set_rng_state(self.state["rng.torch"])
        cuda = sorted(k for k in self.state if k.startswith("rng.cuda."))
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([self.state[k] for k in cuda])
        return self.step


class CheckpointManager:
    def __init__(self, out_dir: str, structure: dict, keep: int = 3):
        self.folder = os.path.join(out_dir, CHECKPOINTS)
        self.structure = structure
        self.keep = keep

    def _dirs(self) -> list[tuple[int, str]]:
        if not os.path.isdir(self.folder):
            return []
        found = []
        for name in os.listdir(self.folder):
            m = _STEP_DIR.match(name)
            if m and os.path.isfile(os.path.join(self.folder, name, "state.json")):
                found.append((int(m[1]), os.path.join(self.folder, name)))
        return sorted(found)

    def latest(self) -> str | None:
        dirs = self._dirs()
        return dirs[-1][1] if dirs else None

    def resolve(self, resume: str | None) -> LoadedCheckpoint | None:
        """The checkpoint ``--resume`` names: ``latest`` (None when there is none yet) or a folder."""
        if resume is None:
            return None
        path = self.latest() if resume == "latest" else resume
        if path is None:
            return None
        if not os.path.isdir(path):
            raise DCGenError(f"--resume {resume}: expected a checkpoint folder (…/checkpoints/step-NNNNNNNN), "
                             "found nothing there.")
        ckpt = LoadedCheckpoint(path)
        ckpt.check_structure(self.structure)
        return ckpt

    def save(self, step: int, stage: str, params: dict, stage_params: list, optimizer, sampler, ema,
             extra: dict, write: bool = True) -> str | None:
        """``params``: every trained tensor of the run (name -> tensor); ``stage_params``: the names the optimizer
        holds, in its order. ``write`` False (FSDP, a process other than the main one): only take part in gathering
        the shards."""
        model = {f"param.{k}": p for k, p in params.items()}
        if ema is not None:
            model.update({f"ema.{k}": v for k, v in ema.shadow.items()})
        model = _contiguous(model, write)
        opt = optimizer.state_dict()
        moments = _contiguous({f"{i}.{key}": v for i, st in opt["state"].items() for key, v in st.items()
                               if torch.is_tensor(v)}, write)
        if not write:
            return None
        os.makedirs(self.folder, exist_ok=True)
        final = os.path.join(self.folder, f"step-{step:08d}")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file(model, os.path.join(tmp, "model.safetensors"))

        tensors, scalars = {}, {}
        for i, st in opt["state"].items():
            for key, value in st.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{i}.{key}"] = moments[f"{i}.{key}"]
                else:
                    scalars.setdefault(str(i), {})[key] = value
        sampler_tensors, sampler_info = sampler.state()
        tensors.update(sampler_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        save_file(_contiguous(tensors), os.path.join(tmp, "state.safetensors"))
        info = {
            "format": FORMAT, "version": VERSION, "step": step, "stage": stage, "structure": self.structure,
            "optimizer": {"params": list(stage_params), "param_groups": opt["param_groups"], "scalars": scalars},
            "sampler": sampler_info,
            "shapes": {k: list(p.shape) for k, p in params.items()},
            **extra,
        }
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if self.keep > 0:
            for _, old in self._dirs()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        return final
