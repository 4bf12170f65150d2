"""Media bytes for tests that more than one test module writes."""

from __future__ import annotations

import io

import av
import numpy as np


def audio_only(container: str = "matroska") -> bytes:
    """A 0.1 s silent PCM track in `container` (matroska, mp4, ...) and no video stream."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as output:
        stream = output.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16",
                                           layout="mono")
        frame.rate = 8000
        for packets in (stream.encode(frame), stream.encode()):
            output.mux(packets)
    return buffer.getvalue()
