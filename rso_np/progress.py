"""Progress inside a round (RSO trials) or an epoch (SGD steps), drawn by tqdm.

``Progress()`` is the ``progress(done, total, what)`` hook that ``rso.RSO``, ``rso_fast.FastRSO``,
``sgd.SGD`` and ``training.Trainer`` call after every trial or step. It shows the count, the rate (trials
per second), the time left in the round and ``what`` (the layer being searched):

- on a terminal, and in a notebook (``tqdm.auto``: a widget where ipywidgets is installed), a bar redrawn
  in place;
- written to a file (a run in the background, ``nohup ... > run.log``), a plain line every ``log_every``
  seconds, never a carriage return.
"""

import sys
import warnings

from tqdm import TqdmWarning
from tqdm import tqdm as plain_tqdm

with warnings.catch_warnings():                   # without ipywidgets tqdm.auto falls back to the text bar
    warnings.simplefilter("ignore", TqdmWarning)
    from tqdm.auto import tqdm as auto_tqdm

LINE = "{n}/{total} {unit}s ({percentage:.0f}%), {desc}, {rate_fmt}, {remaining} left"


def _interactive(stream):
    """A terminal, or the output of a notebook (Jupyter's streams are not terminals, but redraw ``\\r``)."""
    if hasattr(stream, "isatty") and stream.isatty():
        return True
    return stream in (sys.stderr, sys.stdout) and "ipykernel" in sys.modules


class _Lines:
    """A file for tqdm that writes each of its redraws (``\\r`` + status) as one plain line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(f"  {text}\n")

    def flush(self):
        self.stream.flush()


class Progress:
    """The progress hook: one tqdm bar per round, opened at its first trial and closed at its last.

    ``stream``: where to draw (default: standard error); ``unit``: what is counted ("trial" for RSO,
    "step" for SGD); ``log_every``: seconds between two lines when ``stream`` is a file.
    """

    def __init__(self, stream=None, unit="trial", log_every=60.0):
        self.stream = sys.stderr if stream is None else stream
        self.unit, self.log_every = unit, float(log_every)
        self.interactive = _interactive(self.stream)
        self.bar, self.what = None, None

    def __call__(self, done, total, what):
        if self.bar is None or done <= self.bar.n or total != self.bar.total:    # a new round (or resumed)
            self._open(total, what, done - 1)
        elif what != self.what:
            self.what = what
            self.bar.set_description_str(what, refresh=False)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def _open(self, total, what, initial=0):
        """A bar for a round of ``total``; ``initial``: trials already done (a resumed round), which the
        rate and the time left do not count."""
        self.close()
        self.what = what
        if self.interactive:
            self.bar = auto_tqdm(total=total, initial=initial, desc=what, unit=self.unit, file=self.stream,
                                 leave=False, dynamic_ncols=True)
        else:                   # the first line after log_every seconds, then one every log_every seconds
            self.bar = plain_tqdm(total=total, initial=initial, desc=what, unit=self.unit, file=_Lines(self.stream),
                                  leave=False, delay=self.log_every, mininterval=self.log_every,
                                  maxinterval=max(self.log_every, 10.0), bar_format=LINE)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        self.bar, self.what = None, None
