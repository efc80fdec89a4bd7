"""Reading an image from an http(s) URL, safely (``image add URL``).

http and https only; every redirect is re-checked against the same rule (a redirect to
``file:`` or ``ftp:`` is refused, not followed); the size is bounded by
``image_size_cap`` as Glance bounds uploads; a body shorter than its Content-Length is
a truncation, not an image. The caller streams the body straight into the store, so
nothing is left when any of this fails.
"""

from __future__ import annotations

import contextlib
import functools
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from minidriver.exception import MinidriverError

if TYPE_CHECKING:
    import http.client
    import urllib.request

SCHEMES = ("http", "https")
TIMEOUT = 60  # seconds without data before a download is given up


class DownloadError(MinidriverError):
    """The URL could not be read as a whole image."""


def is_url(source: str) -> bool:
    return urllib.parse.urlsplit(source).scheme.lower() in SCHEMES


def check_url(url: str) -> None:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        raise DownloadError(
            f"{url}: only http and https URLs are accepted, not {scheme or 'a bare path'}",
            hint="give a local path or an http(s) URL",
        )


@functools.cache
def _checked_redirects() -> type[urllib.request.HTTPRedirectHandler]:
    # Made on first use: urllib.request brings http.client, ssl and email (~8 ms to
    # import), which only a URL needs, not every command that imports the store.
    import urllib.request  # noqa: PLC0415

    class CheckedRedirects(urllib.request.HTTPRedirectHandler):
        """Follows http(s) redirects only, and says so in our words: urllib's own refusal
        of a ``file:`` target would read as an HTTP error."""

        @staticmethod
        def _check(req: urllib.request.Request, newurl: str) -> None:
            try:
                check_url(newurl)
            except DownloadError as exc:
                raise DownloadError(
                    f"{req.full_url} redirects to {newurl}: refused, only http(s) redirects"
                    " are followed",
                    hint="give the image's final http(s) URL",
                ) from exc

        def http_error_302(
            self,
            req: urllib.request.Request,
            fp: IO[bytes],
            code: int,
            msg: str,
            headers: http.client.HTTPMessage,
        ) -> Any:
            location = headers.get("location") or headers.get("uri")
            if location:
                try:
                    self._check(req, urllib.parse.urljoin(req.full_url, location))
                except DownloadError:
                    fp.close()
                    raise
            return super().http_error_302(req, fp, code, msg, headers)

        http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

        def redirect_request(  # noqa: PLR0917 - urllib calls it positionally
            self,
            req: urllib.request.Request,
            fp: IO[bytes],
            code: int,
            msg: str,
            headers: http.client.HTTPMessage,
            newurl: str,
        ) -> urllib.request.Request | None:
            self._check(req, newurl)
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    return CheckedRedirects


@dataclass
class BoundedBody:
    """The response body, read with its size bounded and its end checked."""

    response: Any
    url: str
    total: int | None  # Content-Length, when the server sent one
    cap: int
    done: int = 0

    def read(self, size: int = -1) -> bytes:
        import http.client  # noqa: PLC0415 - loaded by open_url already

        try:
            chunk: bytes = self.response.read(size)
        except (OSError, http.client.HTTPException) as exc:
            raise DownloadError(
                f"{self.url}: download failed after {self.done} bytes: {exc}"
            ) from exc
        self.done += len(chunk)
        if self.done > self.cap:
            raise DownloadError(
                f"{self.url}: larger than image_size_cap ({self.cap} bytes)",
                hint="raise [DEFAULT] image_size_cap if this image is meant to be that big",
            )
        if not chunk and self.total is not None and self.done != self.total:
            raise DownloadError(
                f"{self.url}: truncated: got {self.done} of {self.total} bytes",
                hint="the server closed the connection early; try again",
            )
        return chunk

    def close(self) -> None:
        self.response.close()


@contextlib.contextmanager
def open_url(url: str, cap: int) -> Iterator[BoundedBody]:
    """Open ``url`` for one pass over its body."""
    import http.client  # noqa: PLC0415 - see _checked_redirects
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    check_url(url)
    opener = urllib.request.build_opener(_checked_redirects()())
    try:
        response = opener.open(url, timeout=TIMEOUT)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{url}: the server answered {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, DownloadError):
            raise exc.reason from exc
        raise DownloadError(f"{url}: cannot connect: {exc.reason}") from exc
    except DownloadError:
        raise
    except (OSError, http.client.HTTPException) as exc:
        raise DownloadError(f"{url}: {exc}") from exc
    length = response.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None
    if total is not None and total > cap:
        response.close()
        raise DownloadError(
            f"{url}: {total} bytes is larger than image_size_cap ({cap} bytes)",
            hint="raise [DEFAULT] image_size_cap if this image is meant to be that big",
        )
    body = BoundedBody(response, url, total, cap)
    try:
        yield body
    finally:
        body.close()
