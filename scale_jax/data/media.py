"""Decoding of encoded media bytes into arrays. Pure numpy: this runs in Grain worker processes.

Each decoder raises MediaError with the reason when the bytes cannot be decoded; callers add the
file name.
"""
import codecs
import functools
import io
import typing
import wave as wave_file
import zipfile

import av
import numpy as np
import scipy.fft
import scipy.signal
import scipy.sparse
import soundfile
from PIL import Image, ImageCms, ImageOps


class MediaError(ValueError):
  """Encoded media that cannot be decoded."""


class SilentAudio(MediaError):
  """A sound track that decodes to silence: nothing to learn from."""


_HEIF_BRANDS = (b'heic', b'heix', b'heim', b'heis', b'hevc', b'hevx')


def _not_media(data: bytes) -> str | None:
  """What a file no decoder reads holds, where a catalogue's usual mistakes show in its first
  bytes, with what to do; None otherwise. A scraper saves the error page it was served under
  the image's name; iPhones take HEIC photos, which nothing here decodes."""
  head = data[:1024].lstrip(b'\xef\xbb\xbf \t\r\n').lower()
  if head.startswith((b'<!doctype html', b'<html')) or b'<html' in head[:256]:
    return 'it is an HTML page, not media (a download served an error page?): fetch it again'
  if head.startswith(b'<svg') or (head.startswith(b'<?xml') and b'<svg' in head):
    return 'it is an SVG drawing, which is not decoded here: render it to PNG'
  brands = data[8:12] + data[16:48]  # an ISO file's major and compatible brands
  if data[4:8] == b'ftyp' and b'avif' not in brands and any(b in brands for b in _HEIF_BRANDS):
    return 'it is an HEIC/HEIF photo (what iPhones take), which is not decoded here: ' \
           'convert it to JPEG'
  try:  # (incremental: a character cut at byte 200 is left for later, not an error)
    text = codecs.getincrementaldecoder('utf-8')().decode(data[:200])
  except UnicodeDecodeError:
    return None
  if text.strip() and all(c.isprintable() or c.isspace() for c in text):
    return f'it is text, not media: it begins {text.strip()[:60]!r}'
  return None


_EXIF_ORIENTATION = 0x0112  # the EXIF tag; 1 is upright


def _float_range(grey: np.ndarray) -> float:
  """The white of a float (TIFF) image: 1 as float images are written (a little over 1 is
  overshoot, clipped), or 255 or 65535 where the values show it holds 8- or 16-bit levels."""
  brightest = float(grey.max(initial=0))
  return 1.0 if brightest <= 2 else 255.0 if brightest <= 256 else 65535.0


def _upright(img: Image.Image) -> Image.Image:
  """An opened image as the shop shows it, in 8 bits: turned by its EXIF orientation (camera
  photos store the sensor's rows), transparent pixels over white (product cut-outs; `convert`
  alone would show the colour stored under them, often black), 16-bit grey scaled to 8 bits
  (`convert` clips it at 255), float grey by its range (_float_range; `convert` reads 0..1 as
  black). RGB, or L or CMYK where stored so: the colours are still those of the file's own
  colour space (_in_srgb)."""
  if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
    img = ImageOps.exif_transpose(img)
  if img.mode.startswith('I') or img.mode == 'F':  # 16-bit (I;16, older Pillow: I) or float
    grey = np.nan_to_num(np.asarray(img, np.float32))
    white = _float_range(grey) if img.mode == 'F' else 65535.0
    img = Image.fromarray(np.clip((grey * (255.0 / white)).round(), 0, 255).astype(np.uint8))
  if img.has_transparency_data:
    img = Image.alpha_composite(Image.new('RGBA', img.size, (255, 255, 255, 255)),
                                img.convert('RGBA'))
  return img if img.mode in ('RGB', 'L', 'CMYK') else img.convert('RGB')


_SRGB = ImageCms.createProfile('sRGB')
_LEVELS = np.linspace(0, 255, 17).astype(np.uint8)
_PROBE = np.stack(np.meshgrid(_LEVELS, _LEVELS, _LEVELS), -1).reshape(-1, 17, 3)  # RGB colours


@functools.lru_cache(maxsize=64)
def _srgb_transform(icc: bytes, mode: str):
  """littlecms's transform from an embedded ICC profile to sRGB for images in `mode` (building
  one costs 5 ms: a catalogue repeats a few profiles). None where the stored colours are shown
  as they are: a profile it cannot read, or of another colour space than the image (a browser
  ignores it, too), or an sRGB one (most JPEGs embed it; converting would cost a millisecond)."""
  try:
    transform = ImageCms.buildTransform(ImageCms.ImageCmsProfile(io.BytesIO(icc)), _SRGB, mode,
                                        'RGB')
  except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
    return None
  if mode == 'RGB':
    shown = np.asarray(ImageCms.applyTransform(Image.fromarray(_PROBE), transform), np.int16)
    if np.abs(shown - _PROBE).max() <= 1:
      return None
  return transform


def _in_srgb(img: Image.Image, icc: bytes | None) -> Image.Image:
  """The image in 8-bit sRGB as a colour-managed browser shows it: converted by its embedded ICC
  profile (a studio's Adobe RGB, a phone's Display P3, a print CMYK); taken as sRGB without one."""
  transform = _srgb_transform(icc, img.mode) if icc else None
  return ImageCms.applyTransform(img, transform) if transform else img.convert('RGB')


def _decoded(data: bytes, size: int) -> Image.Image:
  """The image's pixels, a JPEG's at 1/2, 1/4 or 1/8 scale where that leaves at least twice
  `size` (the DCT scales, an average): the pixels of the full decode within 3/255, 1.7x to 2.8x
  faster for an 800 px photo. Other formats, and JPEGs below twice the size, decode whole."""
  img = Image.open(io.BytesIO(data))
  if min(img.size) >= 4 * size:  # (a call that cannot reduce costs 5% of a small decode)
    img.draft(None, (2 * size, 2 * size))
  img.load()
  return img


_JPEG_START, _JPEG_END = b'\xff\xd8', b'\xff\xd9'
_JPEG_FILL = (127, 128)  # what libjpeg shows where the data ran out (127 in Adobe's CMYK)


def _cut_short_jpeg(data: bytes, size: int) -> Image.Image:
  """A JPEG that ends before its end marker, as a browser shows it: decoded up to where the file
  stops, the rest filled with grey. Kept when every row of pixels is there (the file lost its
  last bytes: the marker, the end of the final row of blocks, as an interrupted download or a
  camera's write leaves it); a MediaError naming the rows lost otherwise."""
  img = _decoded(data + _JPEG_END, size)
  pixels = np.asarray(img).reshape(img.height, -1)
  fill = pixels[-1, 0]
  lost = 0
  if fill in _JPEG_FILL:
    filled = (pixels == fill).all(axis=1)
    lost = img.height - (np.flatnonzero(~filled).max(initial=-1) + 1)
  if lost:
    raise MediaError(f'cannot decode image: the file is cut short, the bottom {lost} of its '
                     f'{img.height} rows (as decoded) are missing')
  return img


def decode_image(data: bytes, size: int) -> np.ndarray:
  """Image bytes (JPEG, PNG, WebP, anything Pillow reads; the first frame of an animation) ->
  float32 [size, size, 3] in [0, 1] of sRGB, upright and over white as _upright makes it. A JPEG
  cut short within its last row of blocks is read as far as it goes (_cut_short_jpeg)."""
  try:
    try:
      img = _decoded(data, size)
    except OSError as e:
      if not (data.startswith(_JPEG_START) and 'truncated' in str(e)):
        raise
      img = _cut_short_jpeg(data, size)
    icc = img.info.get('icc_profile')
    # Colours converted after the resize: 5 ms for a 400 px image, 0.5 ms at 192 px.
    img = _in_srgb(_upright(img).resize((size, size), Image.BILINEAR), icc)
  except MediaError:
    raise
  except Image.UnidentifiedImageError as e:  # its message names a BytesIO object, not the file
    raise MediaError('cannot decode image: ' +
                     (_not_media(data) or 'not in a format Pillow reads')) from e
  except Exception as e:  # PIL raises several unrelated types for corrupt files
    raise MediaError(f'cannot decode image: {e}') from e
  return np.asarray(img, np.float32) / 255.0


def _plane(plane) -> np.ndarray:
  """One plane of a decoded frame as a uint8 [height, width] copy, the line padding dropped."""
  rows = np.frombuffer(plane, np.uint8)[:plane.height * plane.line_size]
  return rows.reshape(plane.height, plane.line_size)[:, :plane.width].copy()


# (Kr, Kb) of the YUV matrix each of FFmpeg's colour spaces (AVColorSpace) names.
_BT601, _BT709 = (0.299, 0.114), (0.2126, 0.0722)
_YUV_MATRICES = {1: _BT709, 4: (0.30, 0.11), 5: _BT601, 6: _BT601, 7: (0.212, 0.087),
                 9: (0.2627, 0.0593), 10: (0.2627, 0.0593)}


def _yuv_matrix(frame) -> tuple[float, float]:
  """(Kr, Kb) of the frame's YUV: as its stream says; untagged, what players assume (mpv's rule):
  BT.709 for HD (at least 1280 wide or more than 576 high), BT.601 below."""
  guess = _BT709 if frame.width >= 1280 or frame.height > 576 else _BT601
  return _YUV_MATRICES.get(frame.colorspace, guess)


class _YuvFrame(typing.NamedTuple):
  """A decoded frame in yuv420p and how to read its colours."""
  y: np.ndarray  # uint8 planes
  u: np.ndarray
  v: np.ndarray
  limited: bool  # limited ("MPEG") range, Y in 16..235: the H.264 default
  matrix: tuple[float, float]  # (Kr, Kb), _yuv_matrix
  transfer: int  # FFmpeg's AVColorTransferCharacteristic: _PQ, _HLG or an SDR curve
  primaries: int  # FFmpeg's AVColorPrimaries: _BT2020 or (as good as) BT.709's


def _yuv_planes(frame) -> _YuvFrame:
  """A decoded frame -> its _YuvFrame."""
  matrix = _yuv_matrix(frame)
  if frame.format.name != 'yuv420p':
    frame = frame.reformat(format='yuv420p')
  if any(p.line_size <= 0 for p in frame.planes):  # bottom-up rows: let PyAV unpack them
    h, w = frame.height, frame.width
    yuv = frame.to_ndarray(format='yuv420p')
    planes = (yuv[:h], *yuv[h:].reshape(2, h // 2, w // 2))
  else:
    planes = tuple(_plane(p) for p in frame.planes)
  return _YuvFrame(*planes, limited=frame.color_range != 2, matrix=matrix,
                   transfer=frame.color_trc, primaries=frame.color_primaries)


@functools.lru_cache(maxsize=None)
def _pass_order(height: int, width: int, size: int):
  """The order of the two separable passes in which Pillow resizes [height, width] to
  [size, size] (BILINEAR): 'hv' (horizontal first) or 'vh'. Pillow picks it from the sizes, and
  the rule has changed between versions, so it is found here by resizing random probes both
  ways; None if the probes cannot tell."""
  rng = np.random.default_rng(0)
  orders = {'hv', 'vh'}
  for _ in range(3):
    probe = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
    whole = np.asarray(probe.resize((size, size), Image.BILINEAR))
    ways = {'hv': probe.resize((size, height), Image.BILINEAR),
            'vh': probe.resize((width, size), Image.BILINEAR)}
    orders &= {o for o, half in ways.items()
               if np.array_equal(np.asarray(half.resize((size, size), Image.BILINEAR)), whole)}
  return orders.pop() if len(orders) == 1 else None


def _horizontal_pass(planes: np.ndarray, size: int) -> np.ndarray:
  """uint8 [n, h, w] -> [n, h, size]: one PIL call, the planes stacked vertically (the
  horizontal pass treats every row on its own)."""
  n, h, w = planes.shape
  if w == size:
    return planes
  stacked = Image.fromarray(np.ascontiguousarray(planes).reshape(n * h, w))
  return np.asarray(stacked.resize((size, n * h), Image.BILINEAR)).reshape(n, h, size)


def _vertical_pass(planes: np.ndarray, size: int) -> np.ndarray:
  """uint8 [n, h, w] -> [n, size, w]: one PIL call, the planes side by side (the vertical pass
  treats every column on its own)."""
  n, h, w = planes.shape
  if h == size:
    return planes
  side = Image.fromarray(np.ascontiguousarray(planes.transpose(1, 0, 2)).reshape(h, n * w))
  out = np.asarray(side.resize((n * w, size), Image.BILINEAR))
  return out.reshape(size, n, w).transpose(1, 0, 2)


def _resize_planes(planes: np.ndarray, size: int) -> np.ndarray:
  """uint8 [n, h, w] -> float32 [n, size, size]; the same pixels as resizing each plane with
  PIL (BILINEAR), in two PIL calls for all n instead of n calls."""
  n, h, w = planes.shape
  order = 'hv' if h == size or w == size else _pass_order(h, w, size)
  if order == 'hv':
    out = _vertical_pass(_horizontal_pass(planes, size), size)
  elif order == 'vh':
    out = _horizontal_pass(_vertical_pass(planes, size), size)
  else:
    out = np.stack([np.asarray(Image.fromarray(p).resize((size, size), Image.BILINEAR))
                    for p in planes])
  return out.astype(np.float32)


_PQ, _HLG = 16, 18  # HDR10's and HLG's transfer (AVCOL_TRC_SMPTE2084, AVCOL_TRC_ARIB_STD_B67)
_BT2020 = 9  # the wide gamut of HDR (AVCOL_PRI_BT2020)
# Linear BT.2020 RGB -> linear BT.709 (= sRGB) RGB, as ITU-R BT.2087 gives it.
_BT2020_TO_BT709 = np.array([[1.6605, -0.5876, -0.0728],
                             [-0.1246, 1.1329, -0.0083],
                             [-0.0182, -0.1006, 1.1187]], np.float32)
_SDR_WHITE_NITS = 203.0  # HDR's diffuse white (ITU-R BT.2408), shown as SDR white
_ROLL_OFF_FROM = 0.7  # of SDR white: brighter HDR light is compressed towards white


def _display_light(signal: np.ndarray, transfer: int) -> np.ndarray:
  """Non-linear RGB in [0, 1] -> the light a screen shows for it, SDR white = 1: PQ and HLG (on a
  1000-nit screen) as ITU-R BT.2100 defines them, every other curve as BT.1886's gamma 2.4."""
  if transfer == _PQ:
    m1, m2, c1, c2, c3 = 0.1593017578125, 78.84375, 0.8359375, 18.8515625, 18.6875
    p = signal ** (1 / m2)
    nits = 10000 * (np.maximum(p - c1, 0) / (c2 - c3 * p)) ** (1 / m1)
  elif transfer == _HLG:
    a, b, c = 0.17883277, 0.28466892, 0.55991073
    scene = np.where(signal <= 0.5, signal ** 2 / 3,
                     (np.exp((signal - c) / a) + b) / 12)
    luma = scene @ np.array([0.2627, 0.6780, 0.0593], np.float32)
    nits = 1000 * luma[..., None] ** 0.2 * scene  # the OOTF, system gamma 1.2
  else:
    return signal ** 2.4
  return nits / _SDR_WHITE_NITS


def _rolled_off(light: np.ndarray) -> np.ndarray:
  """HDR light above _ROLL_OFF_FROM compressed smoothly below SDR white, each pixel by one factor
  (its hue kept), as a player tone-maps HDR for an SDR screen instead of clipping highlights."""
  knee = _ROLL_OFF_FROM
  peak = light.max(-1, keepdims=True)
  over = np.maximum(peak - knee, 0)
  rolled = knee + (1 - knee) * over / (over + 1 - knee)
  return light * np.where(peak > knee, rolled / np.maximum(peak, knee), 1)


def _in_sdr_bt709(rgb: np.ndarray, transfer: int, primaries: int) -> np.ndarray:
  """RGB of an HDR or wide-gamut stream (an iPhone's HLG, HDR10) in [0, 1] -> the SDR BT.709 RGB
  that shows the same light, as players convert it; read as it is, an HDR video looks grey and
  washed out."""
  light = _display_light(rgb, transfer)
  if primaries == _BT2020:
    light = light @ _BT2020_TO_BT709.T
  light = np.maximum(light, 0)  # colours outside BT.709's gamut, clipped to its edge
  if transfer in (_PQ, _HLG):
    light = _rolled_off(light)
  return np.minimum(light, 1) ** (1 / 2.4)


def _frames_to_rgb(frames: list, size: int) -> np.ndarray:
  """Frames from _yuv_planes -> float32 RGB [n, size, size, 3] in [0, 1].

  Resizes the Y, U and V planes first (uint8, PIL; all frames at once) and converts to RGB
  (by each frame's YUV matrix) at the small size, in numpy: swscale's conversion costs several
  times the decoding itself at these sizes.
  """
  if len({(f.y.shape, f.u.shape) for f in frames}) > 1:  # the frame size changed mid-stream
    return np.concatenate([_frames_to_rgb([f], size) for f in frames])
  n = len(frames)
  y = _resize_planes(np.stack([f.y for f in frames]), size)
  uv = _resize_planes(np.stack([f.u for f in frames] + [f.v for f in frames]), size)
  u, v = uv[:n] - 128.0, uv[n:] - 128.0
  limited = np.array([f.limited for f in frames])
  if limited.all():  # Y in 16..235
    y, u, v = (y - 16.0) * (255.0 / 219.0), u * (255.0 / 224.0), v * (255.0 / 224.0)
  elif limited.any():
    y[limited] = (y[limited] - 16.0) * (255.0 / 219.0)
    u[limited] *= 255.0 / 224.0
    v[limited] *= 255.0 / 224.0
  kr, kb = np.array([f.matrix for f in frames], np.float32).T[:, :, None, None]  # [n, 1, 1]
  kg = 1.0 - kr - kb
  rgb = np.stack([y + 2 * (1 - kr) * v,
                  y - (2 * kb * (1 - kb) / kg) * u - (2 * kr * (1 - kr) / kg) * v,
                  y + 2 * (1 - kb) * u], axis=-1)
  rgb = np.clip(rgb, 0.0, 255.0) / 255.0
  for i, f in enumerate(frames):
    if f.transfer in (_PQ, _HLG) or f.primaries == _BT2020:
      rgb[i] = _in_sdr_bt709(rgb[i], f.transfer, f.primaries)
  return rgb


def _frame_to_rgb(frame, size: int) -> np.ndarray:
  """A decoded frame -> float32 RGB [size, size, 3] in [0, 1]."""
  return _frames_to_rgb([_yuv_planes(frame)], size)[0]


_EPSILON_S = 1e-6  # frame times are rationals; a frame this close to a wanted time is on it


def _wanted_frames(container, num_frames: int, fps: float):
  """Yields the frames decode_video takes from the container's first video stream: the first
  frame at or after each of 0, 1/fps, 2/fps, ... seconds from the stream's start, at most
  num_frames, and every frame without a time.

  They are the frames decoding every frame in turn would give, bit for bit, for less work. Before
  each wanted time the decoder starts afresh at the last keyframe at or before it, if that lies
  beyond what was decoded (a keyframe refers to no earlier frame: a phone video has one every
  second or two). Frames before the wanted time that no other frame refers to (the decoder's
  non-reference frames, most B-frames) are not decoded at all.
  """
  if not container.streams.video:
    raise MediaError('no video stream in the file' +
                     (' (it holds only sound)' if container.streams.audio else ''))
  stream = container.streams.video[0]
  if stream.codec_context is None:  # a container FFmpeg reads, a codec it cannot decode
    raise MediaError(f'no decoder for its video stream ({container.format.name})')
  stream.thread_type = 'NONE'  # one decoder thread: the pipeline parallelises over examples
  base = stream.time_base

  def seconds(timestamp):
    return None if timestamp is None or base is None else float(timestamp * base)

  demuxer, packets, keyframes = container.demux(stream), [], []

  def read_until(done) -> None:
    """Demuxes packets (no decoding) until done() or the end of the stream."""
    while not ended() and not done():
      # The demuxer ends with an empty packet: decoding it drains the decoder, and the frames
      # that gives know their time base (unlike those of decoding None).
      packet = next(demuxer, None)
      if packet is None:
        packet = av.Packet()
        packet.time_base = base
      if packet.is_keyframe and seconds(packet.pts) is not None:
        keyframes.append((len(packets), seconds(packet.pts)))
      packets.append(packet)

  def ended() -> bool:
    return bool(packets) and not packets[-1].size

  def decodes_after(time) -> bool:
    last = seconds(packets[-1].dts) if packets else None
    return last is not None and last > time

  # Times count from the stream's first frame, not from 0: a cut from a broadcast or a stream's
  # segment keeps its source's clock (an MPEG-TS often starts at 1 s, a clip cut at 10 s there).
  start = max(0.0, seconds(stream.start_time) or 0.0)
  taken, wanted, position = 0, start, 0  # position: the next packet to decode
  while taken < num_frames:
    # Every keyframe shown by the wanted time has been read once a packet decodes after it (a
    # keyframe's pts is no less than its dts, and dts grow).
    read_until(lambda: decodes_after(wanted))
    restart = max((i for i, t in keyframes if t <= wanted + _EPSILON_S), default=-1)
    if restart > position:
      stream.codec_context.flush_buffers()  # what it holds is shown before the keyframe
      position = restart
    read_until(lambda: len(packets) > position)
    packet = packets[position]  # the end's empty packet returns below, never passed
    position += 1
    time = seconds(packet.pts)
    unwanted = time is not None and time + _EPSILON_S < wanted
    stream.codec_context.skip_frame = 'NONREF' if unwanted else 'DEFAULT'
    for frame in stream.decode(packet):
      if taken < num_frames and (frame.time is None or frame.time + _EPSILON_S >= wanted):
        yield frame
        taken += 1
        wanted += 1.0 / fps
    if not packet.size:
      return


def _display_matrix(frame) -> np.ndarray | None:
  """The linear part [[a, b], [c, d]] of a decoded frame's display matrix, or None without one.

  FFmpeg's layout: nine native int32 [a, b, u, c, d, v, x, y, w], a to d in 16.16 fixed point,
  taking a stored pixel (x, y) (y pointing down) to the shown (a x + c y, b x + d y) plus a shift.
  PyAV's `frame.rotation` is the angle alone, which reads a mirrored frame as a half turn.
  """
  for side_data in frame.side_data:
    if side_data.type == av.sidedata.sidedata.Type.DISPLAYMATRIX:
      matrix = np.frombuffer(bytes(side_data), np.int32)
      return matrix[[0, 1, 3, 4]].reshape(2, 2) if matrix.size == 9 else None
  return None


def _as_displayed(frames: np.ndarray, matrix: np.ndarray | None) -> np.ndarray:
  """Square frames [n, s, s, 3] as a player shows them by `matrix` (`_display_matrix`), snapped
  to the nearest of the four quarter turns, each mirrored or not."""
  if matrix is None:
    return frames
  (a, b), (c, d) = matrix
  if abs(b) + abs(c) > abs(a) + abs(d):  # a quarter turn: x and y trade places
    frames = frames.swapaxes(1, 2)
    flip_rows, flip_columns = b < 0, c < 0
  else:
    flip_rows, flip_columns = d < 0, a < 0
  return frames[:, ::-1 if flip_rows else 1, ::-1 if flip_columns else 1]


def decode_video(data: bytes, num_frames: int, size: int, fps: float) -> tuple[np.ndarray, int]:
  """MP4 bytes -> (float32 [num_frames, size, size, 3] in [0, 1], number of real frames).

  Frames are taken about `fps` per second from the start (the paper's one per second), at most
  num_frames of them; the rest of the array is zeros. They are turned and mirrored as the file's
  display matrix says (a phone's portrait video is stored on its side, with a rotation to show it
  by; the matrix may also mirror it).
  """
  out = np.zeros((num_frames, size, size, 3), np.float32)
  frames, shown_by = [], None
  try:
    # An ISO media file (MP4, MOV): name the demuxer FFmpeg's probing would pick, unprobed.
    with av.open(io.BytesIO(data), format='mp4' if data[4:8] == b'ftyp' else None) as container:
      try:
        for frame in _wanted_frames(container, num_frames, fps):
          frames.append(_yuv_planes(frame))
          shown_by = _display_matrix(frame)
      except av.FFmpegError:
        # A video that breaks off (a web video, its index first, cut short in the download)
        # gives the frames before the break, as a player plays them.
        if not frames:
          raise
  except (av.FFmpegError, IndexError, ValueError) as e:
    raise MediaError(f'cannot decode video: {_not_media(data) or e}') from e
  if not frames:
    raise MediaError('video has no frames')
  # Turned after the resize: the frames are square by then, and it is the same pixels.
  out[:len(frames)] = _as_displayed(_frames_to_rgb(frames, size), shown_by)
  return out, len(frames)


def _window_samples(keep: float | None, rate: int) -> int | None:
  """Samples at `rate` in `keep` seconds, rounded up; None (everything) for None."""
  return None if keep is None else int(np.ceil(keep * rate))


def _mono(frame) -> np.ndarray:
  """A decoded audio frame as float32 [samples] in [-1, 1], its channels mixed."""
  samples = frame.to_ndarray().astype(np.float32)  # [channels, n] planar or [1, n * ch]
  if not frame.format.is_planar:
    samples = samples.reshape(-1, len(frame.layout.channels)).T
  name = frame.format.name  # FFmpeg's: u8, s16, s32, s64, flt, dbl, each maybe planar ('p')
  if name.startswith('u8'):  # unsigned: silence is 128
    samples = (samples - 128.0) / 128.0
  elif name.startswith(('s16', 's32', 's64')):  # signed integer PCM -> [-1, 1]
    samples /= float(2 ** (8 * frame.format.bytes - 1))
  return samples.mean(axis=0)


def _read_sound_track(data: bytes, keep: float | None) -> tuple[np.ndarray, int]:
  """The first `keep` seconds or more (None: all) of the first audio stream of any container
  FFmpeg reads (an MP4's sound track, AAC, MP3): (float32 [samples], rate), mixed to mono.
  A file that breaks off (a truncated FLAC or OGG) gives what it holds before the break, as a
  player plays it and as a truncated WAV or MP3 reads."""
  chunks, rate, total = [], None, 0
  with av.open(io.BytesIO(data)) as container:
    if not container.streams.audio:
      raise MediaError('no audio stream in the file')
    stream = container.streams.audio[0]
    if stream.codec_context is None:  # a container FFmpeg reads, a codec it cannot decode
      raise MediaError(f'no decoder for its audio stream ({container.format.name})')
    try:
      for frame in container.decode(stream):
        rate = frame.sample_rate
        chunks.append(_mono(frame))
        total += len(chunks[-1])
        if keep is not None and total >= _window_samples(keep, rate):
          break
    except av.FFmpegError:
      if not chunks:
        raise
  if not chunks:
    raise MediaError('audio is empty')
  return np.concatenate(chunks), rate


def _read_pcm16_wav(data: bytes, keep: float | None):
  """(float32 [samples, channels], rate) of the first `keep` seconds (None: all) of a plain
  16-bit PCM WAV, as soundfile reads it (x / 32768), through the standard library: libsndfile's
  reads from memory cost 10x more. None for anything else."""
  if data[:4] != b'RIFF' or data[8:12] != b'WAVE':
    return None
  try:
    with wave_file.open(io.BytesIO(data)) as f:
      channels, width, frames = f.getnchannels(), f.getsampwidth(), f.getnframes()
      if width != 2 or f.getcomptype() != 'NONE' or not frames:
        return None
      rate = f.getframerate()
      frames = min(frames, _window_samples(keep, rate) or frames)
      pcm = f.readframes(frames)
  except (wave_file.Error, EOFError, ValueError):
    return None
  if len(pcm) != frames * channels * 2:  # truncated: leave it to libsndfile
    return None
  return np.frombuffer(pcm, '<i2').reshape(frames, channels) / np.float32(32768.0), rate


def _read_sound_file(data: bytes, keep: float | None):
  """(float32 [samples, channels], rate) of the first `keep` seconds (None: all) of a file
  libsndfile reads (WAV, FLAC, OGG, MP3)."""
  with soundfile.SoundFile(io.BytesIO(data)) as f:
    rate = f.samplerate
    return f.read(_window_samples(keep, rate) or -1, dtype='float32', always_2d=True), rate


# Read past the window, so that resampling its last samples sees the clip, not an edge:
# resample_poly's filter reaches 10 / min(rate, sample_rate) seconds either side (about 1 ms);
# the margin is a hundred times that.
_RESAMPLE_MARGIN_S = 0.1


def decode_audio(data: bytes, sample_rate: int,
                 seconds: float | None = None) -> tuple[np.ndarray, int]:
  """Audio bytes -> (mono float32 waveform at sample_rate, its first `seconds` zero-padded (None:
  the whole clip); number of real samples before the padding).

  WAV/FLAC/OGG through libsndfile; anything else FFmpeg reads (an MP4 video's sound track
  included) through PyAV. Only the window is decoded (with a margin for the resampling): a
  minute-long sound track costs what its first seconds do.
  """
  keep = None if seconds is None else seconds + _RESAMPLE_MARGIN_S
  try:
    wave, rate = _read_pcm16_wav(data, keep) or _read_sound_file(data, keep)
    wave = wave[:, 0] if wave.shape[1] == 1 else wave.mean(axis=1)
  except (soundfile.LibsndfileError, RuntimeError, TypeError):
    try:
      wave, rate = _read_sound_track(data, keep)
    except (av.FFmpegError, IndexError, ValueError) as e:
      raise MediaError(f'cannot decode audio: {_not_media(data) or e}') from e
  if wave.size == 0:
    raise MediaError('audio is empty')
  if not np.isfinite(wave).all():  # a float WAV can hold them; one would make the loss NaN
    raise MediaError('audio holds NaN or Inf samples')
  if rate != sample_rate:
    g = np.gcd(rate, sample_rate)
    wave = scipy.signal.resample_poly(wave, sample_rate // g, rate // g).astype(np.float32)
  if seconds is None:
    return wave, len(wave)
  length = int(sample_rate * seconds)
  return np.pad(wave[:length], (0, max(0, length - wave.shape[0]))), min(len(wave), length)


# A clip whose loudest sample is below this holds no sound (16-bit PCM's least step is -90 dBFS):
# a muted video's track, an export's digital silence.
_SILENCE_DBFS = -80.0


def check_sound(wave: np.ndarray) -> None:
  """Raises SilentAudio for a waveform (decode_audio's) without sound: its spectrogram is a
  constant, standardised to zeros, the same for every such product."""
  peak = float(np.abs(wave).max(initial=0.0))
  if peak < 10 ** (_SILENCE_DBFS / 20):
    loudest = f'{20 * np.log10(peak):.0f} dBFS' if peak else 'exactly 0'
    raise SilentAudio(f'the sound track is silent (its loudest sample is {loudest}, below '
                      f'{_SILENCE_DBFS:.0f} dBFS): no sound to learn from')


def decode_features(data: bytes) -> np.ndarray:
  """.npy bytes of a pre-extracted [tokens, dim] (or [dim]) array of real numbers, or an .npz
  holding one such array -> float32 [tokens, dim]."""
  if not data.startswith((b'\x93NUMPY', b'PK\x03\x04')):
    raise MediaError('cannot read features: not a .npy (or .npz) file')
  try:
    x = np.load(io.BytesIO(data), allow_pickle=False)
    if isinstance(x, np.lib.npyio.NpzFile):
      with x:
        if len(x.files) != 1:
          raise MediaError(f'an .npz of {len(x.files)} arrays ({", ".join(x.files[:8])}): '
                           f'give one [tokens, dim] array per file')
        x = x[x.files[0]]
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise MediaError(f'cannot read features: {e}') from e
  if x.ndim == 1:
    x = x[None]
  real = np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
  if x.ndim != 2 or not x.size or not real:
    raise MediaError(f'features must be a non-empty [tokens, dim] array of real numbers, not '
                     f'{x.dtype} {list(x.shape)}')
  if not np.isfinite(x).all():
    raise MediaError('features hold NaN or Inf')
  return x.astype(np.float32)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
  """Triangular filters on the HTK mel scale, [n_fft // 2 + 1, n_mels]."""
  def hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + f / 700.0)

  def mel_to_hz(m):
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

  fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
  edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
  lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
  up = (fft_freqs[:, None] - lower) / (centre - lower)
  down = (upper - fft_freqs[:, None]) / (upper - centre)
  return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _log_mel_constants(sample_rate: int, n_fft: int, n_mels: int):
  """The periodic Hann window (as librosa's) and the filterbank as a sparse [n_mels, bins]
  matrix: each FFT bin feeds at most two triangles."""
  window = scipy.signal.get_window('hann', n_fft)
  window.flags.writeable = False
  filters = mel_filterbank(sample_rate, n_fft, n_mels).T.astype(np.float64)
  return window, scipy.sparse.csr_array(filters)


def log_mel(wave: np.ndarray, sample_rate: int, n_fft: int, hop: int, n_mels: int) -> np.ndarray:
  """Log-mel spectrogram [frames, n_mels]: Hann-windowed power STFT, mel filters, log(x + 1e-6).

  Matches librosa.feature.melspectrogram(center=False, power=2.0, htk=True, norm=None) followed
  by log(x + 1e-6); tests/test_mel.py checks this against a stored librosa reference.
  The STFT is the one scipy.signal.stft(boundary=None, padded=False) computes: frames times the
  window and the real FFT in the wave's precision (float32 for float32 waves). The filterbank is
  applied sparse, without BLAS (whose threads stall for milliseconds on a busy machine), and the
  frames past the last non-zero sample (a short clip's zero padding) are not transformed: their
  power is 0.
  """
  window, filters = _log_mel_constants(sample_rate, n_fft, n_mels)
  wave = np.asarray(wave)
  real = np.float64 if wave.dtype == np.float64 else np.float32
  if len(wave) < n_fft:
    raise ValueError(f'{len(wave)} samples: fewer than the {n_fft} of one window')
  frames = np.lib.stride_tricks.sliding_window_view(wave.astype(real, copy=False), n_fft)[::hop]
  live = len(frames)
  if wave[-1] == 0:  # trailing zeros: frames starting after the last non-zero sample are silent
    nonzero = wave[::-1] != 0
    trailing = int(nonzero.argmax())
    live = min(live, (len(wave) - 1 - trailing) // hop + 1) if nonzero[trailing] else 0
  power = np.empty((len(frames), n_fft // 2 + 1))
  power[live:] = 0
  window = window.astype(real)
  for i in range(0, live, 256):  # blocks of frames: temporaries of about a megabyte at most
    spec = scipy.fft.rfft(frames[i:i + 256] * window)
    block = power[i:i + 256]
    np.square(spec.real, out=block, dtype=np.float64)
    block += np.square(spec.imag, dtype=np.float64)
  mel = filters @ power.T  # [n_mels, frames]
  return np.ascontiguousarray(np.log(mel + 1e-6).astype(np.float32).T)
