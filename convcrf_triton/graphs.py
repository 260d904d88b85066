"""CUDA-graph replay of a whole inference, keyed by shape: one launch from the host instead of tens.

On small images a ConvCRF inference is a few dozen short kernels (features, weights, T iterations of
message passing, pooling, softmax, ...) and the GPU waits on the host between them. :class:`GraphCache`
records the whole call once per input signature (shapes, dtypes, device) in a ``torch.cuda.CUDAGraph``
and afterwards copies the inputs into the graph's static buffers and replays it.

What a replay assumes, and how it is kept true:
- the recorded kernels read the module's parameters and buffers by address: the key includes their
  storage addresses, so ``.to()`` / ``.cuda()`` (new storage) records anew, while in-place updates
  (an optimiser step, ``load_state_dict``) are seen by the next replay;
- what else decides the recorded work (the module's config: a new ``backend``, ``num_iter``, ...) is part of the
  key too (``context``), so a changed config records anew instead of replaying the old one;
- no host synchronisation inside the recording: the input value check runs on the caller's tensors
  before the copy, and is skipped while the stream is being captured;
- Triton's autotuning and compilation happen in warm-up calls on a side stream before the recording;
- one replay at a time per entry, on any stream or thread: a lock orders the host's calls, and each replay's
  stream first waits for the event the previous replay recorded after its output's copy, so that a caller on
  another stream never refills the static inputs while an earlier replay still reads them.

Each entry holds its static inputs, output and the graph's private memory pool; the cache keeps the
``max_entries`` most recently used.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

import torch

WARMUP_CALLS = 2


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor
    done: torch.cuda.Event  # recorded after each replay's output copy


class GraphCache:
    """``fn(*inputs) -> Tensor`` replayed from CUDA graphs, one per input signature.

    ``state``: the tensors ``fn`` reads besides its inputs (parameters, buffers); their addresses are
    part of the key. ``context``: a hashable value of everything else ``fn``'s work depends on (a config), part
    of the key. Calls must not need gradients (graphs are for inference).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], state: Callable[[], Iterable[torch.Tensor]],
                 max_entries: int = 8, context: Callable[[], Hashable] = lambda: None) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.fn, self.state, self.max_entries, self.context = fn, state, max_entries, context
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.captures = 0
        self._lock = threading.Lock()

    def key(self, inputs: tuple[torch.Tensor, ...]) -> tuple:
        return (tuple((tuple(t.shape), t.dtype, t.device) for t in inputs),
                tuple(t.data_ptr() for t in self.state()), self.context())

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, *self.state())):
            raise RuntimeError("CUDA-graph replay is for inference: call it under torch.no_grad() or "
                               "torch.inference_mode()")
        key = self.key(inputs)
        with self._lock, torch.cuda.device(inputs[0].device):
            entry = self.entries.get(key)
            if entry is None:
                entry = self._record(inputs)
                self.entries[key] = entry
                while len(self.entries) > self.max_entries:
                    self.entries.popitem(last=False)
            else:
                self.entries.move_to_end(key)
            stream = torch.cuda.current_stream()
            stream.wait_event(entry.done)  # the previous replay, perhaps on another stream, is done with the buffers
            for static, t in zip(entry.inputs, inputs, strict=True):
                static.copy_(t)
            entry.graph.replay()
            output = entry.output.clone()
            entry.done.record(stream)
            return output

    def _record(self, inputs: tuple[torch.Tensor, ...]) -> _Entry:
        # Ordinary tensors even under inference_mode: later calls copy into them in place, in any mode.
        with torch.inference_mode(False):
            static = tuple(t.detach().clone() for t in inputs)
        side = torch.cuda.Stream(device=static[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile, autotune and allocate outside the recording
            for _ in range(WARMUP_CALLS):
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.fn(*static)
        self.captures += 1
        return _Entry(graph, static, output, torch.cuda.Event())  # (waiting on an unrecorded event: no wait)
