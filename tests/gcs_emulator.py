"""Starts gcp-storage-emulator with the generation semantics of Cloud Storage that it lacks.

Run as `python tests/gcs_emulator.py start --host=... --port=...` (the emulator's own command
line). TensorStore, which writes Orbax checkpoints, reads an object's generation from the
`x-goog-generation` header of a download and makes its writes and cached reads conditional
(`ifGenerationMatch`, `ifGenerationNotMatch`, with generation 0 meaning "no such object").
The emulator sends no such header and ignores the conditions; this wraps its handlers so that
both behave as the Cloud Storage JSON API documents, before its server builds its routes.
"""

from __future__ import annotations

import sys
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _query(request, name: str):
  values = request.query.get(name)
  return values[0] if values else None


def _object_id(request):
  """The object a request names: in the path, or for an upload in `name` or its metadata."""
  if request.params.get("object_id"):
    return request.params["object_id"]
  if _query(request, "name"):
    return _query(request, "name")
  data = request.data
  return data.get("meta", {}).get("name") if isinstance(data, dict) else None


def _generation(storage, request) -> str:
  """The object's current generation, "0" when it does not exist."""
  try:
    return str(storage.get_file_obj(request.params["bucket_name"],
                                    _object_id(request))["generation"])
  except (NotFound, KeyError, TypeError):
    return "0"


def _failed_precondition(request, response, storage, *, not_modified: bool) -> bool:
  """Answers 412 (or 304 for a read whose cached generation is current) when the request's
  generation conditions fail; True when it did."""
  current = _generation(storage, request)
  match, not_match = _query(request, "ifGenerationMatch"), _query(request, "ifGenerationNotMatch")
  if match is not None and match != current:
    response.status = HTTPStatus.PRECONDITION_FAILED
    return True
  if not_match is not None and not_match == current:
    response.status = HTTPStatus.NOT_MODIFIED if not_modified else HTTPStatus.PRECONDITION_FAILED
    return True
  return False


def _with_preconditions(handler, *, read: bool):
  def wrapped(request, response, storage, *args, **kwargs):
    if _object_id(request) and _failed_precondition(request, response, storage,
                                                    not_modified=read):
      return None
    result = handler(request, response, storage, *args, **kwargs)
    if read and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      generation = _generation(storage, request)
      if generation != "0":
        response["x-goog-generation"] = generation
        response["x-goog-metageneration"] = "1"
    return result
  return wrapped


objects.download = _with_preconditions(objects.download, read=True)
objects.get = _with_preconditions(objects.get, read=True)
objects.insert = _with_preconditions(objects.insert, read=False)
objects.delete = _with_preconditions(objects.delete, read=False)

if __name__ == "__main__":
  from gcp_storage_emulator.__main__ import main  # builds the server with the handlers above
  sys.exit(main())
