"""diffusers' private pipeline API that pipeline/internals.py relies on, and our own decode against diffusers'."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from engine_helpers import job

from pipeline import decoding, internals


@pytest.mark.parametrize(("cls", "attr"), internals.REQUIRED, ids=lambda v: str(v))
def test_each_private_diffusers_call_still_exists(cls, attr):
    pipeline_class = getattr(diffusers, cls)
    instance_attrs = {
        "_execution_device",
        "_interrupt",
        "image_processor",
        "vae",
        "transformer",
        "scheduler",
        "vae_scale_factor",
    }
    if attr in instance_attrs:
        # Set in __init__/__call__ or a property: look for it in the class's source.
        import inspect

        source = inspect.getsource(pipeline_class)
        parents = "".join(inspect.getsource(base) for base in pipeline_class.__mro__[1:3])
        assert attr in source or hasattr(pipeline_class, attr) or attr in parents, (
            f"diffusers {diffusers.__version__}: {cls}.{attr} is gone; update pipeline/internals.py"
        )
    else:
        assert callable(getattr(pipeline_class, attr, None)), (
            f"diffusers {diffusers.__version__}: {cls}.{attr} is gone; update pipeline/internals.py"
        )


@pytest.mark.parametrize(("owner", "attr"), internals.REQUIRED_ELSEWHERE, ids=lambda v: str(v))
def test_each_private_diffusers_helper_still_exists(owner, attr):
    import importlib

    try:
        found = importlib.import_module(owner)
    except ModuleNotFoundError:  # a class: module.Class
        module_name, _, class_name = owner.rpartition(".")
        found = getattr(importlib.import_module(module_name), class_name)
    value = getattr(found, attr, None)
    assert callable(value) or isinstance(value, str), (  # a helper, or a hook's registered name
        f"diffusers {diffusers.__version__}: {owner}.{attr} is gone; update pipeline/internals.py"
    )


@pytest.mark.parametrize("family", ["klein", "dev"])
def test_our_decode_of_latent_output_matches_diffusers_pil_output(family, tiny_klein, tiny_dev):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_klein if family == "klein" else tiny_dev, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a red fox", height=64, width=96, num_inference_steps=2, guidance_scale=1.0)
    theirs = pipe(**call, generator=torch.Generator().manual_seed(3), output_type="pil").images[0]
    latents = pipe(**call, generator=torch.Generator().manual_seed(3), output_type="latent").images
    ours = decoding.decode(pipe, decoding.latents_for_vae(pipe, latents, 96, 64))[0]
    assert ours.size == theirs.size == (96, 64)
    difference = np.abs(np.asarray(ours, np.int16) - np.asarray(theirs, np.int16))
    assert difference.max() <= 1, difference.max()


def test_a_placed_pipeline_is_not_asked_where_it_runs_per_batch(tiny_klein, monkeypatch):
    """diffusers' `_execution_device` and its models' `dtype` walk every module of the components for offloading
    hooks at each call; once placed (`LoadedModel` pins it) the runner reads the record instead. Only diffusers'
    own `__call__` still asks, once a batch; the images are the same as an unpinned pipeline's."""
    from diffusers import DiffusionPipeline
    from diffusers.models.modeling_utils import ModelMixin

    from pipeline.batching import Slice
    from pipeline.loader import load_model
    from pipeline.placement import decide_placement
    from pipeline.runner import run_batch
    from pipeline.text_cache import PromptCache
    from pipeline.weights import inspect_model

    model = load_model(inspect_model(tiny_klein), decide_placement(weight_params=1, device="cpu"))
    pipe = model.pipe
    assert vars(pipe)[internals._PLACED] == internals.Placed(
        pipe._execution_device, pipe.transformer.dtype, pipe.vae.dtype
    )
    asked = {"execution_device": 0, "dtype": 0}
    execution, dtype = DiffusionPipeline._execution_device, ModelMixin.dtype

    def counting(name, prop):
        def get(self):
            asked[name] += 1
            return prop.fget(self)

        return property(get)

    monkeypatch.setattr(DiffusionPipeline, "_execution_device", counting("execution_device", execution))
    monkeypatch.setattr(ModelMixin, "dtype", counting("dtype", dtype))

    def image(prompt):
        return np.asarray(run_batch(model, [Slice(job(prompt, size=32), (7,))], PromptCache(1 << 20))[0].images[0])

    pinned = image("a fox")
    assert asked["execution_device"] == 1, asked  # diffusers' __call__ (4 before the pin)
    assert asked["dtype"] == 2, asked  # diffusers' denoise loop reads the transformer's once a step (2 steps)
    del vars(pipe)[internals._PLACED]
    asked.update(execution_device=0, dtype=0)
    unpinned = image("a fox")
    assert asked == {"execution_device": 4, "dtype": 5}, asked
    np.testing.assert_array_equal(pinned, unpinned)
