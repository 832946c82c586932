"""Progress of a long step: a tqdm bar on a terminal, a plain line every PROGRESS_EVERY seconds in a
log file."""
import sys
import time

PROGRESS_EVERY = 30.0  # seconds between progress lines when the output is a log file, not a terminal


class Progress:
    """A tqdm bar on a terminal; where the output goes to a file (a cluster job's log), where bars
    are off, a plain line every PROGRESS_EVERY seconds instead, so a long step is never silent."""

    def __init__(self, iterable, desc: str, total: int | None = None, unit: str = "it", min_total: int = 0):
        from tqdm import tqdm
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        shown = self.total is None or self.total >= min_total
        self.bar = tqdm(iterable, desc=desc, total=self.total, unit=unit, leave=False) \
            if shown and sys.stderr.isatty() else None
        self.quiet, self.postfix = not shown, {}

    def __iter__(self):
        if self.bar is not None:
            yield from self.bar
            return
        started = last = time.monotonic()
        for done, item in enumerate(self.iterable, 1):
            yield item
            now = time.monotonic()
            if not self.quiet and now - last >= PROGRESS_EVERY:
                print(self.line(done, now - started), flush=True)
                last = now

    def line(self, done: int, seconds: float) -> str:
        of = f"/{self.total} ({100 * done / self.total:.0f}%)" if self.total else ""
        left = f", about {seconds * (self.total - done) / done:.0f} s left" if self.total else ""
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        return f"{self.desc}: {done}{of} {self.unit} in {seconds:.0f} s{left}{extra}"

    def set_postfix(self, **values) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**values)
        self.postfix = values

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
