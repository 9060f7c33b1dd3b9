"""Real MRML scenes from the slicer-core wheel (no fake slicer module); skipped without the wheel."""

import pytest

pytest.importorskip("slicer", reason="the MRML tests need the slicer-core wheel")


@pytest.fixture
def headless():
    """A fresh HeadlessScene (scene + application, colour, segmentations, markups, volumes logics)."""
    from ENSAMSegmentLib.mrml.scene import new_scene

    h = new_scene()
    yield h
    h.clear()


@pytest.fixture
def scene(headless):
    """The vtkMRMLScene of a fresh headless scene."""
    return headless.scene


# --- the prompt controller's fixtures (test_promptcontroller*.py): a small real model, both kinds of session

SMALL = dict(init_filters=8, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32)


@pytest.fixture(scope="session")
def small_model_file(tmp_path_factory):
    from ENSAMSegmentLib.core.modelfile import create_untrained_model_file
    from ENSAMSegmentLib.core.network import ENSAMConfig

    return create_untrained_model_file(tmp_path_factory.mktemp("model") / "small.pt", seed=0,
                                       config=ENSAMConfig(**SMALL))


@pytest.fixture(params=["inprocess", "worker"])
def pool(request):
    """Where the controller's sessions come from: this process (CLI, web app) or worker processes (Slicer).
    The same scenarios run against both: they share one request/response contract."""
    from ENSAMSegmentLib.core.session_pool import SessionPool, inprocess_factory, worker_factory

    factory = inprocess_factory() if request.param == "inprocess" else worker_factory(torch_threads=1)
    sessions = SessionPool(factory)
    yield sessions
    sessions.close_all()
