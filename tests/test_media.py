"""Tests for imd.media: content sniffing of uploaded images, sounds and videos.

Every sample is built here with the standard library only (no ffmpeg, no
fixtures on disk); the robustness tests feed truncated, mutated and random
data to the parsers *without* the safety net of :func:`imd.media.probe`.
"""

from __future__ import annotations

import io
import random
import struct
import wave
import zlib

import pytest

from imd import media
from imd.media import MediaInfo, probe


# -- images ---------------------------------------------------------------------

def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def make_png(w: int, h: int) -> bytes:
    raw = (b"\x00" + b"\x80" * (3 * w)) * h
    return (b"\x89PNG\r\n\x1a\n"
            + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(raw))
            + png_chunk(b"IEND", b""))


def make_gif(w: int, h: int) -> bytes:
    """A real GIF: 2-colour palette, LZW codes 'clear, 0' for every pixel."""
    codes = [4, 0] * (w * h) + [5]                   # clear=4, eoi=5, 3-bit codes
    bits = sum(c << (3 * k) for k, c in enumerate(codes))
    lzw = bits.to_bytes((3 * len(codes) + 7) // 8, "little")
    blocks = b"".join(bytes([len(lzw[k:k + 255])]) + lzw[k:k + 255]
                      for k in range(0, len(lzw), 255))
    return (b"GIF89a" + struct.pack("<HHBBB", w, h, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
            + b"," + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x02" + blocks + b"\x00;")


def make_bmp(w: int, h: int, top_down: bool = False) -> bytes:
    stride = (3 * w + 3) & ~3
    pixels = b"\x00" * stride * h
    info = struct.pack("<IiiHHIIiiII", 40, w, -h if top_down else h, 1, 24, 0,
                       len(pixels), 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + len(pixels), 0, 0, 54) + info + pixels


def jpeg_segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def make_jpeg(w: int, h: int, sof: int = 0xC0) -> bytes:
    return (b"\xff\xd8"
            + jpeg_segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
            + jpeg_segment(0xED, b"Photoshop 3.0\x00" + b"\xff\xc0" * 20)   # fake SOF inside
            + b"\xff\xff\xff"                                            # fill bytes
            + jpeg_segment(0xDB, b"\x00" + b"\x01" * 64)
            + jpeg_segment(sof, struct.pack(">BHHB", 8, h, w, 1) + b"\x01\x11\x00")
            + jpeg_segment(0xC4, b"\x00" + b"\x01" + b"\x00" * 15 + b"\x00")
            + jpeg_segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")
            + b"\x00\x00\x00\x00\xff\xd9")


def riff(form: bytes, chunks: bytes) -> bytes:
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + form + chunks


def riff_chunk(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("<I", len(body)) + body + b"\x00" * (len(body) & 1)


def make_webp_vp8x(w: int, h: int) -> bytes:
    vp8x = bytes([0x10, 0, 0, 0]) + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    vp8l = b"\x2f" + struct.pack("<I", (w - 1) | (h - 1) << 14 | 1 << 28) + b"\x00" * 8
    return riff(b"WEBP", riff_chunk(b"VP8X", vp8x) + riff_chunk(b"ALPH", b"\x00" * 3)
                + riff_chunk(b"VP8L", vp8l))


def make_webp_vp8(w: int, h: int) -> bytes:
    frame = b"\x10\x02\x00" + b"\x9d\x01\x2a" + struct.pack("<HH", w, h) + b"\x00" * 10
    return riff(b"WEBP", riff_chunk(b"VP8 ", frame))


def make_webp_vp8l(w: int, h: int) -> bytes:
    body = b"\x2f" + struct.pack("<I", (w - 1) | (h - 1) << 14) + b"\x00" * 6
    return riff(b"WEBP", riff_chunk(b"VP8L", body))


# -- audio ------------------------------------------------------------------------

def make_wav(seconds: float, rate: int = 8000, width: int = 2, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(b"\x00" * int(seconds * rate) * width * channels)
    return buf.getvalue()


def make_amr(frames: int) -> bytes:
    return b"#!AMR\n" + (b"\x3c" + b"\x55" * 31) * frames       # FT 7 (12.2 kbit/s)


def make_amr_wb(frames: int) -> bytes:
    return b"#!AMR-WB\n" + (b"\x44" + b"\x55" * 60) * frames    # FT 8 (23.85 kbit/s)


def mp3_header(bitrate_index: int, rate_index: int, version: int = 3,
               pad: int = 0, mode: int = 1) -> bytes:
    h = (0x7FF << 21 | version << 19 | 1 << 17 | 1 << 16 | bitrate_index << 12
         | rate_index << 10 | pad << 9 | mode << 6)
    return struct.pack(">I", h)


def id3v2(payload: int = 300) -> bytes:
    size = bytes([(payload >> s) & 0x7F for s in (21, 14, 7, 0)])
    return b"ID3\x04\x00\x00" + size + b"\x00" * payload


def make_mp3_cbr(frames: int) -> bytes:
    """MPEG1 layer III, 128 kbit/s, 48 kHz: 384-byte frames of 24 ms."""
    return b"".join(mp3_header(9, 1) + b"\x00" * 380 for _ in range(frames))


def make_mp3_xing(total_frames: int) -> bytes:
    """ID3v2 + Xing frame (44.1 kHz, 128 kbit/s, 417 bytes) + a few frames."""
    xing = mp3_header(9, 0) + b"\x00" * 32 + b"Xing" + struct.pack(">II", 1, total_frames)
    xing += b"\x00" * (417 - len(xing))
    return id3v2() + xing + (mp3_header(9, 0) + b"\x00" * 413) * 5


def make_adts(frames: int, rate_index: int = 8, length: int = 200) -> bytes:
    header = bytes([0xFF, 0xF1, 0x40 | rate_index << 2, 0x40 | (length >> 11),
                    (length >> 3) & 0xFF, (length & 7) << 5 | 0x1F, 0xFC])
    return (header + b"\x00" * (length - 7)) * frames


_OGG_TABLE = []
for _i in range(256):
    _r = _i << 24
    for _ in range(8):
        _r = ((_r << 1) ^ 0x04C11DB7) if _r & 0x80000000 else _r << 1
    _OGG_TABLE.append(_r & 0xFFFFFFFF)


def ogg_crc(data: bytes) -> int:
    crc = 0
    for b in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_TABLE[(crc >> 24) ^ b]
    return crc


def ogg_page(packet: bytes, granule: int, seq: int, flags: int = 0, serial: int = 0x1234) -> bytes:
    lacing = [255] * (len(packet) // 255) + [len(packet) % 255]
    header = (b"OggS" + struct.pack("<BBqIII", 0, flags, granule, serial, seq, 0)
              + bytes([len(lacing)]) + bytes(lacing))
    page = header + packet
    return page[:22] + struct.pack("<I", ogg_crc(page)) + page[26:]


def make_opus(seconds: float, pre_skip: int = 312) -> bytes:
    head = b"OpusHead" + struct.pack("<BBHIhB", 1, 1, pre_skip, 16000, 0, 0)
    tags = b"OpusTags" + struct.pack("<I", 4) + b"test" + struct.pack("<I", 0)
    pages = [ogg_page(head, 0, 0, 0x02), ogg_page(tags, 0, 1)]
    step, total = 960 * 50, pre_skip + int(seconds * 48000)   # ~1 s per page
    for seq, granule in enumerate(range(pre_skip + step, total + step, step), 2):
        last = granule >= total
        pages.append(ogg_page(b"\xfc" + b"\x00" * 300, min(granule, total), seq,
                              0x04 if last else 0))
    return b"".join(pages)


def make_vorbis(seconds: float, rate: int = 44100) -> bytes:
    ident = b"\x01vorbis" + struct.pack("<IBIiiiBB", 0, 2, rate, 0, 128000, 0, 0xB8, 1)
    comment = b"\x03vorbis" + struct.pack("<I", 4) + b"test" + struct.pack("<I", 0) + b"\x01"
    setup = b"\x05vorbis" + b"\x00" * 600                       # spans several segments
    pages = [ogg_page(ident, 0, 0, 0x02), ogg_page(comment + setup, 0, 1)]
    pages.append(ogg_page(b"\x00" * 500, rate, 2))
    pages.append(ogg_page(b"\x00" * 500, -1, 3, 0x01))           # no packet ends here
    pages.append(ogg_page(b"\x00" * 500, int(seconds * rate), 4, 0x04))
    return b"".join(pages)


# -- ISO base media ------------------------------------------------------------------

def box(kind: bytes, *children: bytes) -> bytes:
    body = b"".join(children)
    return struct.pack(">I", 8 + len(body)) + kind + body


MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


def mvhd(timescale: int, duration: int) -> bytes:
    return box(b"mvhd", struct.pack(">IIIII", 0, 0, 0, timescale, duration),
               struct.pack(">IH10x", 0x10000, 0x100), MATRIX, b"\x00" * 24, struct.pack(">I", 3))


def tkhd(width: int, height: int, version: int = 0) -> bytes:
    if version == 1:
        times = struct.pack(">IQQIIQ", 1 << 24 | 3, 0, 0, 1, 0, 1000)
    else:
        times = struct.pack(">IIIIII", 3, 0, 0, 1, 0, 1000)
    return box(b"tkhd", times, b"\x00" * 8, struct.pack(">HHHH", 0, 0, 0, 0), MATRIX,
               struct.pack(">II", width << 16, height << 16))


def trak(handler: bytes, width: int = 0, height: int = 0, version: int = 0) -> bytes:
    hdlr = box(b"hdlr", b"\x00" * 8, handler, b"\x00" * 12, b"handler\x00")
    return box(b"trak", tkhd(width, height, version), box(b"mdia", hdlr))


def ftyp(brand: bytes) -> bytes:
    return box(b"ftyp", brand, b"\x00\x00\x02\x00", brand, b"isom")


def make_mp4(brand: bytes = b"isom", w: int = 640, h: int = 330, version: int = 0) -> bytes:
    moov = box(b"moov", mvhd(1000, 5000), trak(b"soun"), trak(b"vide", w, h, version))
    return ftyp(brand) + box(b"free") + box(b"mdat", b"\x00" * 1000) + moov


def make_m4a(brand: bytes = b"M4A ", seconds: int = 3) -> bytes:
    moov = box(b"moov", mvhd(44100, 44100 * seconds), trak(b"soun"))
    return ftyp(brand) + moov + box(b"mdat", b"\x00" * 1000)


# -- EBML ------------------------------------------------------------------------------

def ebml(ident: int, *children: bytes, size: int | None = None) -> bytes:
    body = b"".join(children)
    length = len(body) if size is None else size
    n = next(n for n in range(1, 9) if length < (1 << 7 * n) - 1)
    return (ident.to_bytes((ident.bit_length() + 7) // 8, "big")
            + ((1 << 7 * n) | length).to_bytes(n, "big") + body)


def ebml_uint(ident: int, value: int) -> bytes:
    return ebml(ident, value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


WEBM_HEADER = ebml(0x1A45DFA3, ebml_uint(0x4286, 1), ebml_uint(0x42F7, 1), ebml_uint(0x42F2, 4),
                   ebml_uint(0x42F3, 8), ebml(0x4282, b"webm"), ebml_uint(0x4287, 4),
                   ebml_uint(0x4285, 2))
LIVE_SEGMENT = b"\x18\x53\x80\x67\x01\xff\xff\xff\xff\xff\xff\xff"   # unknown size


def make_webm(w: int = 640, h: int = 360, live: bool = False) -> bytes:
    info = ebml(0x1549A966, ebml_uint(0x2AD7B1, 1000000), ebml(0x4489, struct.pack(">d", 3000.0)))
    audio = ebml(0xAE, ebml_uint(0xD7, 1), ebml_uint(0x83, 2), ebml(0x86, b"A_OPUS"),
                 ebml(0xE1, ebml(0xB5, struct.pack(">f", 48000.0)), ebml_uint(0x9F, 2)))
    video = ebml(0xAE, ebml_uint(0xD7, 2), ebml_uint(0x83, 1), ebml(0x86, b"V_VP8"),
                 ebml(0xE0, ebml_uint(0xB0, w), ebml_uint(0xBA, h)))
    cluster = ebml(0x1F43B675, ebml_uint(0xE7, 0), ebml(0xA3, b"\x81\x00\x00\x80" + b"\x00" * 50))
    body = info + ebml(0x1654AE6B, audio, video) + cluster
    if live:   # as written by live encoders
        return WEBM_HEADER + LIVE_SEGMENT + body
    return WEBM_HEADER + ebml(0x18538067, body)


# -- the samples and what probe must say about them -----------------------------------

SAMPLES: dict[str, tuple[bytes, MediaInfo]] = {
    "png": (make_png(746, 750), MediaInfo("image", "png", "image/png", 746, 750)),
    "gif": (make_gif(40, 30), MediaInfo("image", "gif", "image/gif", 40, 30)),
    "bmp": (make_bmp(33, 20), MediaInfo("image", "bmp", "image/bmp", 33, 20)),
    "bmp-top-down": (make_bmp(33, 20, True), MediaInfo("image", "bmp", "image/bmp", 33, 20)),
    "jpeg": (make_jpeg(746, 750), MediaInfo("image", "jpg", "image/jpeg", 746, 750)),
    "jpeg-progressive": (make_jpeg(1024, 768, 0xC2),
                         MediaInfo("image", "jpg", "image/jpeg", 1024, 768)),
    "webp-vp8x": (make_webp_vp8x(746, 750), MediaInfo("image", "webp", "image/webp", 746, 750)),
    "webp-vp8": (make_webp_vp8(320, 240), MediaInfo("image", "webp", "image/webp", 320, 240)),
    "webp-vp8l": (make_webp_vp8l(16383, 2), MediaInfo("image", "webp", "image/webp", 16383, 2)),
    "wav": (make_wav(3.2), MediaInfo("audio", "wav", "audio/wav", seconds=3)),
    "amr": (make_amr(150), MediaInfo("audio", "amr", "audio/amr", seconds=3)),
    "amr-wb": (make_amr_wb(260), MediaInfo("audio", "amr", "audio/amr-wb", seconds=5)),
    "mp3": (make_mp3_cbr(125), MediaInfo("audio", "mp3", "audio/mpeg", seconds=3)),
    "mp3-id3": (id3v2() + make_mp3_cbr(125) + b"TAG" + b"\x00" * 125,
                MediaInfo("audio", "mp3", "audio/mpeg", seconds=3)),
    "mp3-xing": (make_mp3_xing(2297), MediaInfo("audio", "mp3", "audio/mpeg", seconds=60)),
    "mp3-mpeg2": (b"".join(mp3_header(8, 0, version=2) + b"\x00" * 204 for _ in range(212)),
                  MediaInfo("audio", "mp3", "audio/mpeg", seconds=6)),       # 64k, 22050 Hz
    "aac": (make_adts(47), MediaInfo("audio", "aac", "audio/aac", seconds=3)),
    "opus": (make_opus(3), MediaInfo("audio", "ogg", "audio/ogg", seconds=3)),
    "vorbis": (make_vorbis(7), MediaInfo("audio", "ogg", "audio/ogg", seconds=7)),
    "m4a": (make_m4a(), MediaInfo("audio", "m4a", "audio/mp4", seconds=3)),
    "mp4-sound-only": (make_m4a(b"isom", 4), MediaInfo("audio", "m4a", "audio/mp4", seconds=4)),
    "mp4": (make_mp4(), MediaInfo("video", "mp4", "video/mp4", 640, 330)),
    "mp4-tkhd-v1": (make_mp4(version=1, w=1920, h=1080),
                    MediaInfo("video", "mp4", "video/mp4", 1920, 1080)),
    "mov": (make_mp4(b"qt  "), MediaInfo("video", "mov", "video/quicktime", 640, 330)),
    "3gp": (make_mp4(b"3gp4", 176, 144), MediaInfo("video", "3gp", "video/3gpp", 176, 144)),
    "webm": (make_webm(), MediaInfo("video", "webm", "video/webm", 640, 360)),
    "webm-live": (make_webm(1280, 720, live=True),
                  MediaInfo("video", "webm", "video/webm", 1280, 720)),
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_samples(name: str) -> None:
    data, expected = SAMPLES[name]
    assert probe(data) == expected


def test_suffix() -> None:
    assert SAMPLES["jpeg"][1].suffix() == "746x750"
    assert SAMPLES["amr"][1].suffix() == "3"
    assert SAMPLES["mp4"][1].suffix() == "640x330"


def test_other_buffer_types() -> None:
    data = SAMPLES["png"][0]
    assert probe(bytearray(data)) == SAMPLES["png"][1]
    assert probe(memoryview(data)) == SAMPLES["png"][1]
    assert probe("not bytes") is None                          # type: ignore[arg-type]


@pytest.mark.parametrize("seconds, expected", [(0.2, 1), (2.5, 3), (3.49, 3), (59.6, 60)])
def test_duration_rounding(seconds: float, expected: int) -> None:
    info = probe(make_wav(seconds, rate=1000))
    assert info is not None and info.seconds == expected


def test_amr_stops_at_invalid_frame() -> None:
    data = make_amr(100) + b"\xff" + make_amr(100)[6:]           # padding bits set
    assert probe(data) == MediaInfo("audio", "amr", "audio/amr", seconds=2)


def test_long_amr_is_extrapolated() -> None:
    frames = media._MAX_FRAMES * 3 // 2 + 10
    assert probe(make_amr(frames)).seconds == round(frames * 0.02)


def test_mp3_vbri() -> None:
    frame = mp3_header(9, 0) + b"\x00" * 32 + b"VBRI" + struct.pack(">HHHII", 1, 0, 75, 0, 766)
    frame += b"\x00" * (417 - len(frame))
    assert probe(frame + (mp3_header(9, 0) + b"\x00" * 413) * 3).seconds == 20


def test_mp3_after_padding_following_id3() -> None:
    data = id3v2() + b"\x00" * 2000 + make_mp3_cbr(125)
    assert probe(data) == SAMPLES["mp3"][1]


def test_mp4_large_box_and_size_zero() -> None:
    big_mdat = struct.pack(">I4sQ", 1, b"mdat", 16 + 100) + b"\x00" * 100
    moov = box(b"moov", mvhd(600, 600), trak(b"vide", 720, 1280))
    tail = struct.pack(">I4s", 0, b"mdat") + b"\x00" * 50           # runs to end of file
    assert probe(ftyp(b"mp42") + big_mdat + moov + tail) == \
        MediaInfo("video", "mp4", "video/mp4", 720, 1280)


def test_old_quicktime_without_ftyp() -> None:
    moov = box(b"moov", mvhd(600, 600), trak(b"vide", 320, 240))
    assert probe(box(b"wide") + box(b"mdat", b"\x00" * 10) + moov).ext == "mov"


@pytest.mark.parametrize("data", [
    make_png(0, 10), make_png(70000, 10), make_gif(0, 5), make_bmp(0, 4),
    make_jpeg(0, 100), make_webp_vp8(0, 5),
    ftyp(b"isom") + box(b"moov", mvhd(1000, 5000), trak(b"vide")),   # no dimensions
    ftyp(b"isom") + box(b"moov", mvhd(1000, 5000)),                  # no tracks
    ftyp(b"M4A ") + box(b"moov", mvhd(0, 5000), trak(b"soun")),      # zero timescale
    make_m4a(seconds=25 * 3600),                                     # absurd duration
    riff(b"WAVE", riff_chunk(b"fmt ", struct.pack("<HHIIHH", 1, 1, 1, 1, 1, 8))
         + riff_chunk(b"data", b"\x00" * 100_000)),                  # > 24 h
    make_wav(0), make_amr(0), b"#!AMR\n", make_opus(0),
    make_mp3_cbr(1)[:-1], make_adts(1)[:-1],
    b"", b"\xff", b"RIFF", b"OggS", b"ID3", b"\x1a\x45\xdf\xa3",
])
def test_rejected(data: bytes) -> None:
    assert probe(data) is None


def test_text_file() -> None:
    text = b"Hello, this is a plain text file, not a picture.\n" * 200
    assert probe(text) is None
    assert probe(b"BM is a text that starts like a bitmap" * 10) is None
    assert probe(b"<html><body>GIF89a</body></html>") is None


def _check(data: bytes) -> None:
    """The parsers themselves (not the safety net in probe) must not raise."""
    result = media._sniff(data)
    assert result is None or isinstance(result, MediaInfo)
    if result is not None:
        assert result.kind in ("image", "audio", "video")
        if result.kind == "audio":
            assert 1 <= result.seconds <= 24 * 3600
        else:
            assert 0 < result.width <= 65535 and 0 < result.height <= 65535


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_prefix(name: str) -> None:
    data = SAMPLES[name][0]
    for k in range(len(data)):
        _check(data[:k])


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_mutations(name: str) -> None:
    rng = random.Random(name)
    data = SAMPLES[name][0]
    for _ in range(300):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(min(len(mutated), 600))   # headers live up front
            mutated[pos] = rng.choice((0, 0xFF, 0x80, 0x7F, rng.randrange(256)))
        _check(bytes(mutated))


MAGICS = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP",
          b"RIFF\x00\x00\x00\x00WAVE", b"BM", b"#!AMR\n", b"#!AMR-WB\n", b"OggS",
          b"\x1a\x45\xdf\xa3", b"\x00\x00\x00\x08ftyp", b"ID3", b"\xff\xfb", b"\xff\xf1"]


def test_random_bytes() -> None:
    rng = random.Random(20240611)
    for _ in range(3000):
        noise = rng.randbytes(rng.randrange(0, 400))
        _check(noise)
        _check(rng.choice(MAGICS) + noise)


def test_deep_nesting_does_not_recurse() -> None:
    depth = 20000
    nested = b"".join(struct.pack(">I4s", 8 * (depth - k), b"moov") for k in range(depth))
    assert probe(ftyp(b"isom") + nested) is None
    traks = b"".join(struct.pack(">I4s", 8 * (depth - k), b"trak") for k in range(depth))
    assert probe(ftyp(b"isom") + box(b"moov", mvhd(1, 1), traks)) is None
    assert probe(WEBM_HEADER + LIVE_SEGMENT * depth) is None
    tracks = b"\x16\x54\xae\x6b\x01\xff\xff\xff\xff\xff\xff\xff" * depth
    assert probe(WEBM_HEADER + LIVE_SEGMENT + tracks) is None


def test_large_inputs() -> None:
    mp3 = make_mp3_cbr(20 * 1024 * 1024 // 384)
    assert probe(mp3).seconds == round(len(mp3) * 8 / 128000)
    aac = make_adts(20 * 1024 * 1024 // 800, length=800)
    assert probe(aac).seconds == round(len(aac) // 800 * 1024 / 16000)
    for magic in MAGICS:
        _check(magic + b"\xff" * (4 * 1024 * 1024))
        _check(magic + b"\x00" * (4 * 1024 * 1024))
