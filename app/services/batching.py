"""Cross-request micro-batching: encodings that arrive within a short window run as one forward.

/retrieve image and text encodings, and /generate-lora's routing embedding of the description, are queued per
tower. The first item of a batch waits `window_s` for company, then up to `max_items` samples from every
waiting request go through the model in one forward, each sample with its own request's adapter (a per-sample
bank: `app.ml.lora.per_sample_lora`; requests without an adapter get a zero row, which is the base model
exactly). Each request gets back its own rows. The queue is bounded (`max_queue` samples): beyond it, a 503.

A batch is one unit of admission (`Admission.unit`): its forward takes one model-work slot, however many
requests it serves, and requests do not hold their own slot while they wait for a batch, so a batch can grow
past the slot limit; the batcher's queue (`max_queue` samples) bounds what waits.

Equal to unbatched up to float rounding: a sample's result does not depend on the others in its batch, except
through how the BLAS kernel blocks the matrices (tests/test_batching.py checks the rankings match and scores
agree to 1e-5).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from app.core.errors import Overloaded
from app.core.metrics import Metrics
from app.services.admission import Admission
from app.services.engine import Engine

TOWERS = ("text", "image")


@dataclass
class _Job:
    inputs: list[str] | torch.Tensor  # N strings, or [N, 3, H, W] pixels
    adapter: torch.Tensor | None  # [D], or None for the base model
    future: asyncio.Future = field(repr=False)

    def __len__(self) -> int:
        return len(self.inputs)


class MicroBatcher:
    def __init__(self, engine: Engine, window_s: float, max_items: int, max_queue: int, metrics: Metrics,
                 admission: Admission):
        self.engine, self.window_s, self.max_items, self.max_queue = engine, window_s, max_items, max_queue
        self.metrics, self.admission = metrics, admission
        self._queues: dict[str, list[_Job]] = {t: [] for t in TOWERS}
        self._flushers: dict[str, asyncio.Task] = {}

    @property
    def queued(self) -> int:
        return sum(len(j) for q in self._queues.values() for j in q)

    async def encode(self, tower: str, inputs: list[str] | torch.Tensor, adapter: torch.Tensor | None) -> torch.Tensor:
        """[N, embed_dim] for this request's inputs, computed together with whatever else is waiting."""
        if self.queued + len(inputs) > self.max_queue:
            self.metrics.shed.labels("batch_queue_full").inc()
            raise Overloaded(f"the micro-batch queue holds {self.queued} items (limit {self.max_queue}); retry shortly")
        job = _Job(inputs, adapter, asyncio.get_running_loop().create_future())
        self._queues[tower].append(job)
        self.metrics.batch_queue.set(self.queued)
        flusher = self._flushers.get(tower)
        if flusher is None or flusher.done():
            self._flushers[tower] = asyncio.create_task(self._flush(tower))
        return await job.future

    async def _flush(self, tower: str) -> None:
        await asyncio.sleep(self.window_s)
        queue = self._queues[tower]
        while queue:
            jobs, size = [], 0
            while queue and (not jobs or size + len(queue[0]) <= self.max_items):
                job = queue.pop(0)
                if not job.future.done():  # a request that was cut (deadline, disconnect) is skipped
                    jobs.append(job)
                    size += len(job)
            self.metrics.batch_queue.set(self.queued)
            if not jobs:
                continue
            self.metrics.batch_size.observe(size)
            try:
                async with self.admission.unit() as slot:  # the whole batch: one unit of model work
                    outputs = await slot.run(self._forward, tower, jobs)
            except Exception as e:
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            for job, out in zip(jobs, outputs, strict=True):
                if not job.future.done():
                    job.future.set_result(out)

    def _forward(self, tower: str, jobs: list[_Job]) -> list[torch.Tensor]:
        """Blocking: one forward over every job's samples -> each job's [n, embed_dim]."""
        if tower == "text":
            inputs = [text for job in jobs for text in job.inputs]
        else:
            inputs = torch.cat([job.inputs for job in jobs])
        bank, index = self._bank(jobs)
        emb = self.engine.embed_mixed(tower, inputs, bank, index)
        return list(emb.split([len(job) for job in jobs]))

    def _bank(self, jobs: list[_Job]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Distinct adapters [U, D] (row 0 zeros: the base model) and each sample's row; (None, None) when no
        job has an adapter, so an all-base batch runs the plain model."""
        if all(job.adapter is None for job in jobs):
            return None, None
        rows: dict[int, int] = {}
        vectors = [torch.zeros(self.engine.layout.D)]
        index = []
        for job in jobs:
            row = 0
            if job.adapter is not None:
                row = rows.setdefault(id(job.adapter), len(vectors))
                if row == len(vectors):
                    vectors.append(job.adapter.float().cpu())
            index += [row] * len(job)
        return torch.stack(vectors), torch.tensor(index, dtype=torch.long)

    def close(self) -> None:
        for task in self._flushers.values():
            task.cancel()
