"""JSON bodies encoded once, straight to bytes.

Litestar's generic path for a returned ``dict`` resolves serializers and type encoders
on every response; for the busiest reads that cost as much as the database query
(measured with ``bench/api_throughput.py``), so they hand Litestar finished bytes.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Response
from litestar.enums import MediaType

_encoder = msgspec.json.Encoder()


def json_response(payload: Any, status_code: int = 200) -> Response[bytes]:
    return Response(content=_encoder.encode(payload), media_type=MediaType.JSON,
                    status_code=status_code)

