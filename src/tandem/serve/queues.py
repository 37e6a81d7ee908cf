"""A stage's queue in the serving engine (:mod:`.engine`): the images waiting for one stage, and the batch it
should run next."""

from __future__ import annotations

from collections import deque

from .jobs import Image


class StageQueue:
    """A stage's queue: images in arrival order, batched by ``key`` (images that can share one model call)."""

    def __init__(self, name: str, max_batch: int, max_wait: float, key):
        self.name, self.max_batch, self.max_wait, self.key = name, max_batch, max_wait, key
        self.items: deque[Image] = deque()

    def __len__(self) -> int:
        return len(self.items)

    def ready(self, now: float, flush: bool = False) -> tuple[list[Image] | None, float | None]:
        """The batch to run now (the oldest image and the next images of its kind, up to ``max_batch``) if it is
        full, its oldest image has waited ``max_wait`` or ``flush``; else None and the time it will be due."""
        if not self.items:
            return None, None
        first = self.items[0]
        kind = self.key(first)
        batch = [im for im in self.items if self.key(im) == kind][:self.max_batch]
        due = first.enqueued + self.max_wait
        if len(batch) >= self.max_batch or now >= due or flush:
            return batch, None
        return None, due

    def remove(self, images) -> None:
        gone = {id(im) for im in images}
        self.items = deque(im for im in self.items if id(im) not in gone)
