"""Progress inside a round (RSO trials) or an epoch (SGD steps), drawn by tqdm.

``Progress()`` is the ``progress(done, total, what)`` hook that ``rso.RSO``, ``rso_fast.FastRSO``,
``sgd.SGD`` and ``training.Trainer`` call after every trial or step. It shows the count, the rate (trials
per second), the time left in the round and ``what`` (the layer being searched):

- on a terminal, and in a notebook (``tqdm.auto``: a widget where ipywidgets is installed), a bar redrawn
  in place;
- written to a file (a run in the background, ``nohup ... > run.log``), a plain line every ``log_every``
  seconds, never a carriage return.

The time left in the round: a trial of one layer can take a hundred times as long as one of another
(at minibatch 5000 on a 2-core CPU, 2 ms for the dense layer, about 0.3 s for conv2, 1.5 s for bn1), so
the count of trials left times the current rate says little. Once a round has been seen, each layer's
seconds per trial in it give the estimate for the next round ("left in the round"); before that, the
trials left at the current layer's pace ("left at this pace"). The time between a layer's first trial
and the last one of the layer before holds more than a trial (the evaluation after that pass, the store
pass of the new layer's inputs): it counts as the new layer's setup, part of the next round's estimate
but not of the layer's pace. A resumed run has seen no round in this process: ``remember`` gives it the
pace of the last round recorded in its history (each layer pass's seconds, ``pass_seconds``).
"""

import sys
import warnings

import tqdm.std
from tqdm import TqdmWarning
from tqdm import tqdm as plain_tqdm

with warnings.catch_warnings():                   # without ipywidgets tqdm.auto falls back to the text bar
    warnings.simplefilter("ignore", TqdmWarning)
    from tqdm.auto import tqdm as auto_tqdm

LINE = "{n}/{total} {unit}s ({percentage:.0f}%), {desc}, {rate_fmt}{postfix}"


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
        self.pace = {}          # the last round seen: layer -> (trials, seconds per trial), in its order
        self.setup = {}         # the last round seen: layer -> seconds before its first trial beyond a trial
        self._after = {}        # the last round seen: layer -> seconds of the layers after it
        self._round = {}        # this round so far: layer -> [trials, trials timed, their seconds, setup]
        self._last = None       # (done, time) at the previous call

    def __call__(self, done, total, what):
        now = tqdm.std.time()
        if self.bar is None or done <= self.bar.n or total != self.bar.total:    # a new round (or resumed)
            self._open(total, what, done - 1)
        new_layer = what != self.what
        if new_layer:
            self.what = what
            self.bar.set_description_str(what, refresh=False)
        seen = self._round.setdefault(what, [0, 0, 0.0, 0.0])
        if self._last is None:                      # the round's first trial here: counted, not timed
            seen[0] += 1
        elif new_layer:                             # a layer's first trial: its setup, counted, not timed
            seen[0] += done - self._last[0]
            seen[3] += now - self._last[1]
        else:                                       # the trials since the last call, and their time
            seen[0] += done - self._last[0]
            seen[1] += done - self._last[0]
            seen[2] += now - self._last[1]
        self._last = (done, now)
        self.bar.set_postfix_str(self._left(what, done, total), refresh=False)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def _left(self, what, done, total):
        """The time left in the round, as text: from the last round's pace of each layer still to come,
        where that round covered them; else the trials left at this layer's pace so far."""
        if what in self.pace:
            trials, per = self.pace[what]
            left = max(0, trials - self._round[what][0]) * per + self._after[what]
            return f"{plain_tqdm.format_interval(left)} left in the {'round' if self.unit == 'trial' else 'epoch'}"
        _, timed, seconds, _ = self._round[what]
        if done < total and not timed:
            return "? left"
        left = (total - done) * seconds / timed if done < total else 0
        return f"{plain_tqdm.format_interval(left)} left at this pace"

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
        if self._round:                             # this round's pace is the next round's estimate
            self.pace = {w: (n, t / k if k else 0.0) for w, (n, k, t, _) in self._round.items()}
            # the setup: the time before the first trial, less that trial at the layer's pace
            self.setup = {w: max(0.0, g - self.pace[w][1]) if g else 0.0
                          for w, (_, _, _, g) in self._round.items()}
            self._sum_after()
        self.bar, self.what, self._round, self._last = None, None, {}, None

    def remember(self, passes):
        """The pace of a round seen before this process (a resumed run's last recorded round), used until
        this process has seen a round whole: ``passes`` is [(layer, trials, seconds)] in search order,
        the seconds of a pass counting its setup."""
        if self.pace:
            return
        self.pace = {w: (n, t / n) for w, n, t in passes if n}
        self.setup = {w: 0.0 for w in self.pace}
        self._sum_after()

    def _sum_after(self):
        """_after[layer]: the seconds of the layers after it in the round seen (trials and setup)."""
        self._after, later = {}, 0.0
        for w, (n, per) in reversed(self.pace.items()):
            self._after[w], later = later, later + n * per + self.setup[w]
