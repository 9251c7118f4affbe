"""Recording without transcoding: RTP packets of a room's tracks into WebM, Ogg and MP4 files.

Public names: `Recorder` (the Trio component the SFU feeds), `Manifest` and `TrackFile` (what it
writes), `BlobStore` (where). The pure pieces (RTP parsing, reorder buffer, VP8/Opus/H.264
depacketizers, WebM/Ogg/MP4 writers) live in the `_` modules and import nothing from Trio.
"""

from edge.recording._manifest import MANIFEST_VERSION, Manifest, TrackFile
from edge.recording.recorder import BlobStore, Recorder, RecorderStats

__all__ = ["MANIFEST_VERSION", "BlobStore", "Manifest", "Recorder", "RecorderStats", "TrackFile"]
