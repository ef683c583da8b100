"""Content sniffing for uploaded media (66boss upload protocol).

The daemon never trusts a filename or a client supplied Content-Type.
:func:`probe` looks at the uploaded bytes themselves, decides whether they are
an image, a sound or a video in one of the supported formats, and derives the
numbers that go into the reply URL (``<hex>-746x750.jpg``, ``<hex>-3.mp3``,
``<hex>-640x330.mp4``): pixel width and height for pictures and videos, the
duration in whole seconds for sounds.

Only container / frame headers are parsed, with the standard library alone.
The input is hostile: every parser is bounded by the buffer length and by a
step budget, nothing recurses on data, and anything odd yields ``None``.
:func:`probe_file` looks at an upload of up to ~20 MB through a memory map, in a
thread; whole-file work is done with C-level methods (of ``bytes`` or ``mmap``) wherever
possible, and a parser only reads the pages it looks at.

Supported:

* images: JPEG, PNG, GIF, WebP (VP8, VP8L, VP8X), BMP
* audio:  MP3 (MPEG 1/2/2.5 layer I-III, Xing/Info/VBRI or CBR), AMR-NB,
  AMR-WB, WAV, Ogg Vorbis / Opus, M4A (MP4 with sound only), ADTS AAC
* video:  MP4 / MOV / 3GP (ISO base media), WebM / Matroska
"""

from __future__ import annotations

import mmap
import re
import struct
import zlib
from dataclasses import dataclass
from itertools import islice
from typing import Iterator

__all__ = ["MediaInfo", "probe", "probe_file"]

MAX_DIMENSION = 65535
MAX_SECONDS = 24 * 3600
_MAX_STEPS = 4096           # boxes / elements / segments / chunks per level
_MAX_TRACKS = 16            # tracks looked at in MP4 / Matroska
_MAX_FRAMES = 100_000       # AMR / ADTS frames walked (over half an hour);
                            # beyond that the rest is extrapolated by size
_SYNC_WINDOW = 64 * 1024    # how far past an ID3 tag we look for a frame


@dataclass(frozen=True)
class MediaInfo:
    """What :func:`probe` found out about an upload."""

    kind: str      # "image" | "audio" | "video"
    ext: str       # canonical extension without the dot
    mime: str
    width: int = 0
    height: int = 0
    seconds: int = 0

    def suffix(self) -> str:
        """The URL part: ``"746x750"`` for images/videos, ``"3"`` for audio."""
        if self.kind == "audio":
            return str(self.seconds)
        return f"{self.width}x{self.height}"


def probe(data: bytes) -> MediaInfo | None:
    """Identify data; None when it is not a recognised, well-formed-enough media file."""
    try:
        if not isinstance(data, (bytes, mmap.mmap)):
            data = bytes(data)                       # bytearray, memoryview
        return _sniff(data)
    except Exception:   # safety net only: the parsers are meant not to raise
        return None


def probe_file(path) -> MediaInfo | None:
    """:func:`probe` on a file through a read-only memory map: only the pages the parsers
    look at are read (an upload is never held in memory).  Blocking file I/O: call it in a
    thread."""
    with open(path, "rb") as f:
        if not f.seek(0, 2):
            return None                              # mmap refuses an empty file
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return probe(data)


# -- helpers -----------------------------------------------------------------

def _picture(kind: str, ext: str, mime: str, w: int, h: int) -> MediaInfo | None:
    if not (0 < w <= MAX_DIMENSION and 0 < h <= MAX_DIMENSION):
        return None
    return MediaInfo(kind, ext, mime, width=w, height=h)


def _image(ext: str, w: int, h: int) -> MediaInfo | None:
    mime = "image/jpeg" if ext == "jpg" else f"image/{ext}"
    return _picture("image", ext, mime, w, h)


def _audio(ext: str, mime: str, seconds: float) -> MediaInfo | None:
    if not 0 < seconds <= MAX_SECONDS:
        return None
    return MediaInfo("audio", ext, mime, seconds=max(1, int(seconds + 0.5)))


def _u16be(d: bytes, i: int) -> int:
    return (d[i] << 8) | d[i + 1]


def _u32be(d: bytes, i: int) -> int:
    return struct.unpack_from(">I", d, i)[0]


def _sniff(d: bytes) -> MediaInfo | None:
    head = d[:12]
    if head.startswith(b"\xff\xd8\xff"):
        return _jpeg(d)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png(d)
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return _gif(d)
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return _webp(d)
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return _wav(d)
    if head.startswith(b"BM"):
        return _bmp(d)
    if head.startswith(b"#!AMR-WB\n"):
        return _amr(d, wideband=True)
    if head.startswith(b"#!AMR\n"):
        return _amr(d, wideband=False)
    if head.startswith(b"OggS"):
        return _ogg(d)
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return _matroska(d)
    if head[4:8] in _BMFF_FIRST_BOXES:
        return _bmff(d)
    return _mpeg_audio(d)


# -- images --------------------------------------------------------------------

_FILL = re.compile(rb"\xff+")
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}   # not DHT, JPG, DAC


def _jpeg(d: bytes) -> MediaInfo | None:
    n, i = len(d), 2
    for _ in range(_MAX_STEPS):
        if i >= n or d[i] != 0xFF:
            return None
        i = _FILL.match(d, i).end()            # marker prefix plus fill bytes
        if i >= n:
            return None
        marker = d[i]
        i += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:   # TEM, RSTn, SOI
            continue
        if marker in (0x00, 0xD9, 0xDA) or i + 2 > n:  # stuffing, EOI, SOS
            return None
        seglen = _u16be(d, i)
        if seglen < 2:
            return None
        if marker in _SOF:
            if seglen < 8 or i + 7 > n:
                return None
            return _image("jpg", _u16be(d, i + 5), _u16be(d, i + 3))
        i += seglen
    return None


def _png(d: bytes) -> MediaInfo | None:
    if len(d) < 33 or d[8:16] != b"\x00\x00\x00\x0dIHDR":
        return None
    if zlib.crc32(d[12:29]) != _u32be(d, 29):
        return None
    return _image("png", _u32be(d, 16), _u32be(d, 20))


def _gif(d: bytes) -> MediaInfo | None:
    if len(d) < 13:
        return None
    w, h = struct.unpack_from("<HH", d, 6)
    return _image("gif", w, h)


def _webp(d: bytes) -> MediaInfo | None:
    if len(d) < 30:
        return None
    chunk = d[12:16]
    if chunk == b"VP8X":
        w = 1 + int.from_bytes(d[24:27], "little")
        h = 1 + int.from_bytes(d[27:30], "little")
    elif chunk == b"VP8 ":
        if d[23:26] != b"\x9d\x01\x2a":        # key frame start code
            return None
        w, h = struct.unpack_from("<HH", d, 26)
        w, h = w & 0x3FFF, h & 0x3FFF
    elif chunk == b"VP8L":
        if d[20] != 0x2F:
            return None
        bits = struct.unpack_from("<I", d, 21)[0]
        w, h = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    else:
        return None
    return _image("webp", w, h)


def _bmp(d: bytes) -> MediaInfo | None:
    if len(d) < 26:
        return None
    header = struct.unpack_from("<I", d, 14)[0]
    if header == 12:                                 # BITMAPCOREHEADER
        w, h, planes = struct.unpack_from("<HHH", d, 18)
    elif header in (16, 40, 52, 56, 64, 108, 124) and len(d) >= 28:
        w, h, planes = struct.unpack_from("<iiH", d, 18)
    else:
        return None
    if planes != 1:
        return None
    return _image("bmp", w, abs(h))                  # negative height: top-down


# -- simple audio containers ---------------------------------------------------

def _wav(d: bytes) -> MediaInfo | None:
    n, i, byte_rate = len(d), 12, 0
    for _ in range(_MAX_STEPS):
        if i + 8 > n:
            return None
        cid, size = struct.unpack_from("<4sI", d, i)
        body = i + 8
        if cid == b"fmt ":
            if size < 16 or body + 16 > n:
                return None
            _, channels, rate, byte_rate = struct.unpack_from("<HHII", d, body)
            if not channels or not rate:
                return None
        elif cid == b"data":
            if not byte_rate:
                return None
            return _audio("wav", "audio/wav", min(size, n - body) / byte_rate)
        i = body + size + (size & 1)
    return None


# Frame sizes including the header byte, indexed by frame type (RFC 4867).
_AMR_NB_SIZES = (13, 14, 16, 18, 20, 21, 27, 32, 6, 1, 1, 1, 1, 1, 1, 1)
_AMR_WB_SIZES = (18, 24, 33, 37, 41, 47, 51, 59, 61, 6, 1, 1, 1, 1, 1, 1)


def _amr_table(sizes: tuple[int, ...]) -> tuple[int, ...]:
    # header byte: P(1) FT(4) Q(1) P(2); padding bits must be zero
    return tuple(0 if b & 0x83 else sizes[b >> 3] for b in range(256))


_AMR_NB = _amr_table(_AMR_NB_SIZES)
_AMR_WB = _amr_table(_AMR_WB_SIZES)


def _extrapolate(count: float, start: int, stop: int, n: int) -> float:
    """Scale a count over d[start:stop] to d[start:n] when the walk was cut short."""
    return count * (n - start) / (stop - start) if stop < n else count


def _amr(d: bytes, wideband: bool) -> MediaInfo | None:
    table, i = (_AMR_WB, 9) if wideband else (_AMR_NB, 6)
    n, start, frames = len(d), i, 0
    while i < n and frames < _MAX_FRAMES:
        size = table[d[i]]
        if not size or i + size > n:
            break
        i += size
        frames += 1
    if frames == _MAX_FRAMES:
        frames = _extrapolate(frames, start, i, n)
    return _audio("amr", "audio/amr-wb" if wideband else "audio/amr", frames * 0.02)


def _ogg_page(d: bytes, i: int) -> tuple[int, int, int] | None:
    """(granule, serial, packet offset) of the Ogg page at i."""
    if i + 27 > len(d) or d[i:i + 4] != b"OggS" or d[i + 4] != 0:
        return None
    granule, serial = struct.unpack_from("<qI", d, i + 6)
    return granule, serial, i + 27 + d[i + 26]


def _ogg(d: bytes) -> MediaInfo | None:
    first = _ogg_page(d, 0)
    if first is None or not d[5] & 0x02:             # beginning-of-stream page
        return None
    _, serial, p = first
    if d[p:p + 8] == b"OpusHead" and p + 16 <= len(d):
        rate, skip = 48000, struct.unpack_from("<H", d, p + 10)[0]
    elif d[p:p + 7] == b"\x01vorbis" and p + 16 <= len(d):
        rate, skip = struct.unpack_from("<I", d, p + 12)[0], 0
    else:
        return None
    if not rate:
        return None
    end = len(d)
    for _ in range(256):                             # last page with a granule
        i = d.rfind(b"OggS", 0, end)
        if i <= 0:
            return None
        page = _ogg_page(d, i)
        if page and page[1] == serial and page[0] >= 0:
            return _audio("ogg", "audio/ogg", (page[0] - skip) / rate)
        end = i
    return None


# -- MPEG audio: MP3 and ADTS AAC -----------------------------------------------

_MP3_BITRATES = {   # kbps by (mpeg1?, layer)
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MP3_BITRATES[(False, 3)] = _MP3_BITRATES[(False, 2)]
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
_ADTS_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050,
               16000, 12000, 11025, 8000, 7350)


@dataclass(frozen=True)
class _Mp3Frame:
    version: int        # 3 = MPEG1, 2 = MPEG2, 0 = MPEG2.5
    layer: int
    kbps: int
    rate: int
    samples: int
    length: int
    mono: bool


def _mp3_frame(d: bytes, i: int) -> _Mp3Frame | None:
    if i + 4 > len(d):
        return None
    h = _u32be(d, i)
    version, layer = (h >> 19) & 3, 4 - ((h >> 17) & 3)
    bri, sri = (h >> 12) & 15, (h >> 10) & 3
    if (h >> 21) != 0x7FF or version == 1 or layer == 4 or bri in (0, 15) or sri == 3:
        return None
    mpeg1 = version == 3
    kbps, rate = _MP3_BITRATES[(mpeg1, layer)][bri], _MP3_RATES[version][sri]
    pad = (h >> 9) & 1
    if layer == 1:
        samples, length = 384, (12000 * kbps // rate + pad) * 4
    else:
        samples = 576 if layer == 3 and not mpeg1 else 1152
        length = samples // 8 * 1000 * kbps // rate + pad
    return _Mp3Frame(version, layer, kbps, rate, samples, length, (h >> 6) & 3 == 3)


def _adts_frame(d: bytes, i: int) -> tuple[int, int, int] | None:
    """(frame length, sample rate, samples) of the ADTS frame at i."""
    if i + 7 > len(d) or d[i] != 0xFF or d[i + 1] & 0xF6 != 0xF0:
        return None
    sri = (d[i + 2] >> 2) & 15
    length = ((d[i + 3] & 3) << 11) | (d[i + 4] << 3) | (d[i + 5] >> 5)
    if sri >= len(_ADTS_RATES) or length < (7 if d[i + 1] & 1 else 9):
        return None
    return length, _ADTS_RATES[sri], 1024 * ((d[i + 6] & 3) + 1)


def _skip_id3(d: bytes) -> int:
    """Offset just past any leading ID3v2 tags, -1 for a malformed tag."""
    i = 0
    for _ in range(8):                               # a few stacked tags at most
        if i + 10 > len(d) or d[i:i + 3] != b"ID3":
            break
        size = d[i + 6:i + 10]
        if any(b & 0x80 for b in size):              # sizes are syncsafe
            return -1
        footer = 10 if d[i + 5] & 0x10 else 0
        i += 10 + footer + (size[0] << 21 | size[1] << 14 | size[2] << 7 | size[3])
    return i


def _mpeg_audio(d: bytes) -> MediaInfo | None:
    start = _skip_id3(d)
    if start < 0 or start >= len(d):
        return None
    # Without a tag the stream must start right away; after one, allow padding.
    end = min(len(d), start + _SYNC_WINDOW) if start else 1
    i = start
    while i < end:
        i = d.find(b"\xff", i, end)
        if i < 0:
            return None
        if _adts_frame(d, i):
            info = _adts(d, i)
        else:
            info = _mp3(d, i)
        if info:
            return info
        i += 1
    return None


def _adts(d: bytes, i: int) -> MediaInfo | None:
    n, start, frames, samples, rate = len(d), i, 0, 0, 0
    while frames < _MAX_FRAMES:
        frame = _adts_frame(d, i)
        if frame is None or (rate and frame[1] != rate) or i + frame[0] > n:
            break
        i, rate, samples, frames = i + frame[0], frame[1], samples + frame[2], frames + 1
    if not rate or (frames < 2 and i != n):          # one frame must be confirmed
        return None
    if frames == _MAX_FRAMES:
        samples = _extrapolate(samples, start, i, n)
    return _audio("aac", "audio/aac", samples / rate)


def _mp3(d: bytes, i: int) -> MediaInfo | None:
    f = _mp3_frame(d, i)
    if f is None:
        return None
    end = len(d) - (128 if d[-128:-125] == b"TAG" else 0)    # ID3v1
    nxt = i + f.length
    if nxt != end:                                   # confirm with next header
        g = _mp3_frame(d, nxt)
        if g is None or (g.version, g.layer, g.rate) != (f.version, f.layer, f.rate):
            return None
    frames = _vbr_frames(d, i, f)
    if frames:
        seconds = frames * f.samples / f.rate
    else:
        seconds = max(0, end - i) * 8 / (f.kbps * 1000)
    return _audio("mp3", "audio/mpeg", seconds)


def _vbr_frames(d: bytes, i: int, f: _Mp3Frame) -> int:
    """Frame count from a Xing/Info or VBRI header in the frame at i, else 0."""
    if f.layer != 3:
        return 0
    side = (17 if f.mono else 32) if f.version == 3 else (9 if f.mono else 17)
    x = i + 4 + side
    if d[x:x + 4] in (b"Xing", b"Info") and x + 12 <= len(d):
        flags, frames = struct.unpack_from(">II", d, x + 4)
        return frames if flags & 1 else 0
    v = i + 36
    if d[v:v + 4] == b"VBRI" and v + 18 <= len(d):
        return _u32be(d, v + 14)
    return 0


# -- ISO base media (MP4, MOV, 3GP, M4A) ----------------------------------------

_BMFF_FIRST_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"})
_M4A_BRANDS = frozenset({b"M4A ", b"M4B ", b"M4P ", b"F4A "})


def _boxes(d: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """Yield (type, body start, body end) for the boxes in d[start:end]."""
    i = start
    for _ in range(_MAX_STEPS):
        if i + 8 > end:
            return
        size, kind = struct.unpack_from(">I4s", d, i)
        header = 8
        if size == 1:
            if i + 16 > end:
                return
            size, header = struct.unpack_from(">Q", d, i + 8)[0], 16
        elif size == 0:
            size = end - i                           # box runs to the end
        if size < header:
            return
        yield kind, i + header, min(i + size, end)   # truncated box is clipped
        i += size


def _child(d: bytes, span: tuple[int, int] | None, kind: bytes) -> tuple[int, int] | None:
    if span is None:
        return None
    for k, s, e in _boxes(d, span[0], span[1]):
        if k == kind:
            return s, e
    return None


def _bmff(d: bytes) -> MediaInfo | None:
    brand, moov = b"qt  ", None                      # no ftyp: old QuickTime
    for n, (kind, s, e) in enumerate(_boxes(d, 0, len(d))):
        if kind == b"ftyp" and n == 0 and e - s >= 4:
            brand = d[s:s + 4]
        elif kind == b"moov":
            moov = (s, e)
            break
    if moov is None:
        return None
    dims, sound = None, False
    traks = (span for kind, *span in _boxes(d, *moov) if kind == b"trak")
    for s, e in islice(traks, _MAX_TRACKS):
        if dims is None:
            dims = _tkhd_dims(d, _child(d, (s, e), b"tkhd"))
        hdlr = _child(d, _child(d, (s, e), b"mdia"), b"hdlr")
        if hdlr and hdlr[1] - hdlr[0] >= 12 and d[hdlr[0] + 8:hdlr[0] + 12] == b"soun":
            sound = True
    if dims:
        if brand == b"qt  ":
            ext, mime = "mov", "video/quicktime"
        elif brand.startswith(b"3g"):
            ext, mime = "3gp", "video/3gpp"
        else:
            ext, mime = "mp4", "video/mp4"
        return _picture("video", ext, mime, *dims)
    if sound or brand in _M4A_BRANDS:
        seconds = _mvhd_seconds(d, _child(d, moov, b"mvhd"))
        return _audio("m4a", "audio/mp4", seconds) if seconds else None
    return None


def _tkhd_dims(d: bytes, span: tuple[int, int] | None) -> tuple[int, int] | None:
    if span is None or span[0] >= span[1]:
        return None
    s, e = span
    at = s + (88 if d[s] == 1 else 76)               # version 1 has 64-bit times
    if at + 8 > e:
        return None
    w, h = struct.unpack_from(">II", d, at)
    w, h = (w + 0x8000) >> 16, (h + 0x8000) >> 16    # 16.16 fixed point
    return (w, h) if w and h else None


def _mvhd_seconds(d: bytes, span: tuple[int, int] | None) -> float:
    if span is None or span[0] >= span[1]:
        return 0.0
    s, e = span
    if d[s] == 1:
        if s + 32 > e:
            return 0.0
        scale, duration = struct.unpack_from(">IQ", d, s + 20)
        unknown = 0xFFFFFFFFFFFFFFFF
    else:
        if s + 20 > e:
            return 0.0
        scale, duration = struct.unpack_from(">II", d, s + 12)
        unknown = 0xFFFFFFFF
    if not scale or duration == unknown:
        return 0.0
    return duration / scale


# -- EBML (WebM, Matroska) --------------------------------------------------------

_EBML, _DOCTYPE, _SEGMENT, _TRACKS = 0x1A45DFA3, 0x4282, 0x18538067, 0x1654AE6B
_TRACK_ENTRY, _VIDEO, _PIXEL_W, _PIXEL_H = 0xAE, 0xE0, 0xB0, 0xBA


def _vint(d: bytes, i: int, end: int) -> tuple[int, int] | None:
    """(raw value with length marker, length) of the EBML varint at i."""
    if i >= end or d[i] == 0:
        return None
    n = 9 - d[i].bit_length()
    if i + n > end:
        return None
    return int.from_bytes(d[i:i + n], "big"), n


def _elements(d: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """Yield (id, body start, body end) for the EBML elements in d[start:end]."""
    i = start
    for _ in range(_MAX_STEPS):
        ident = _vint(d, i, end)
        if ident is None or ident[1] > 4:
            return
        size = _vint(d, i + ident[1], end)
        if size is None:
            return
        mask = (1 << (7 * size[1])) - 1
        body = i + ident[1] + size[1]
        if size[0] & mask == mask:                   # unknown size: to the end
            yield ident[0], body, end
            return
        yield ident[0], body, min(body + (size[0] & mask), end)
        i = body + (size[0] & mask)


def _element(d: bytes, span: tuple[int, int] | None, ident: int) -> tuple[int, int] | None:
    if span is None:
        return None
    for k, s, e in _elements(d, span[0], span[1]):
        if k == ident:
            return s, e
    return None


def _uint(d: bytes, span: tuple[int, int] | None) -> int:
    if span is None or not 0 < span[1] - span[0] <= 8:
        return 0
    return int.from_bytes(d[span[0]:span[1]], "big")


def _matroska(d: bytes) -> MediaInfo | None:
    top = list(islice(_elements(d, 0, len(d)), 2))
    if len(top) < 2 or top[0][0] != _EBML or top[1][0] != _SEGMENT:
        return None
    doctype = _element(d, top[0][1:], _DOCTYPE)
    if doctype and d[doctype[0]:doctype[1]].rstrip(b"\0") not in (b"webm", b"matroska"):
        return None
    tracks = _element(d, top[1][1:], _TRACKS)
    if tracks is None:
        return None
    entries = (span for kind, *span in _elements(d, *tracks) if kind == _TRACK_ENTRY)
    for s, e in islice(entries, _MAX_TRACKS):
        video = _element(d, (s, e), _VIDEO)
        w, h = _uint(d, _element(d, video, _PIXEL_W)), _uint(d, _element(d, video, _PIXEL_H))
        if w and h:
            return _picture("video", "webm", "video/webm", w, h)
    return None
