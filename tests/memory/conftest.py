"""Shared by the memory-plan tests: a handle on the runtime objects q3n builds while compiling."""

import pytest

from q3n_compile.memory import arena_runtime


@pytest.fixture
def runtimes(monkeypatch):
    """Every :class:`MemoryRuntime` built while the test runs, oldest first."""
    built = []
    original = arena_runtime.MemoryRuntime.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(arena_runtime.MemoryRuntime, "__init__", spy)
    return built
