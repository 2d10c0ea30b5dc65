"""`altclip serve`'s app (FastAPI): the search page and a JSON API over a table, typed parameters
and response models, and an OpenAPI document that lists the table's own columns as filters."""

from __future__ import annotations

import copy
import importlib.resources
import os
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.decode.thumbnails import DEFAULT_SIZE as DEFAULT_THUMBNAIL_SIZE
from pipeline.decode.thumbnails import SIZES as THUMBNAIL_SIZES
from pipeline.query.filters import MAX_FILTER_VALUES, Filters
from pipeline.serve.models import (
    IMAGE_BODY,
    NOT_FOUND,
    SEARCH_ERRORS,
    Columns,
    Info,
    Results,
    SearchParams,
    SearchRequest,
    TextSearchParams,
    error_answer,
)
from pipeline.serve.searcher import Searcher, ServeError
from pipeline.serve.server import (
    LOOPBACK_NAMES,
    Answers,
    AppServer,
    RequestGuard,
    is_loopback,
    listen,
)

WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
SWAGGER_UI_DIR = str(importlib.resources.files("fastapi_offline") / "static")
MAX_JSON_BYTES = 1 << 20
MAX_UPLOAD_BYTES = 32 << 20
MAX_FORM_FIELDS = 2 * MAX_FILTER_VALUES
BODY_LIMITS = {"/api/search": MAX_JSON_BYTES, "/api/search/image": MAX_UPLOAD_BYTES}


# ------------------------------------------------------------------------------------------ app


def make_app(searcher: Searcher, allowed_hosts: set | None = None) -> FastAPI:
    """The page and the API over `searcher`; `allowed_hosts`: the Host names answered (None: any)."""
    app = FastAPI(title="altclip serve", version="1", docs_url=None, redoc_url=None,
                  default_response_class=NoStoreJSON)
    # Registered in this order, which is the OpenAPI document's order of paths.
    _table_routes(app, searcher)
    _search_routes(app, searcher)
    _row_routes(app, searcher)
    _page_routes(app)
    _answer_errors(app)
    app.openapi = lambda: openapi_document(app, searcher)
    # Added last, so outermost: the guard refuses before any route, Answers wraps everything.
    app.add_middleware(RequestGuard, allowed_hosts=allowed_hosts, body_limits=BODY_LIMITS)
    app.add_middleware(Answers)
    return app


def _table_routes(app: FastAPI, searcher: Searcher) -> None:
    """What the table holds: the page's header and its filters."""

    @app.get("/api/info", response_model=Info, summary="The table and model served",
             operation_id="info")
    def info():
        return searcher.info()

    @app.get("/api/columns", response_model=Columns, response_model_exclude_unset=True,
             operation_id="columns",
             summary="Filterable columns, their types, and the values of small string columns")
    def columns():
        return {"columns": searcher.columns()}


def _search_routes(app: FastAPI, searcher: Searcher) -> None:
    """Searches by a text (query string or JSON body) and by an uploaded image."""

    @app.get("/api/search", response_model=Results, responses={**SEARCH_ERRORS, **NOT_FOUND},
             operation_id="searchText", summary="Search by text (or by a stored row with `id`)")
    def search_text(params: Annotated[TextSearchParams, Query()], request: Request):
        filters = Filters.from_query(request.query_params.multi_items())
        if params.id is not None:  # "more like this" by a stored row (no model work)
            vector = searcher.row_vector(params.id, params.against)
        else:
            vector = searcher.embed_text(params.text or "")
        return searcher.search(vector, params.k, params.against, filters)

    @app.post("/api/search", response_model=Results, responses=SEARCH_ERRORS,
              max_body_size=BODY_LIMITS["/api/search"],
              operation_id="searchTextJson", summary="Search by text, the query as JSON")
    def search_json(body: SearchRequest):
        vector = searcher.embed_text(body.text)
        return searcher.search(vector, body.k, body.against, Filters.from_json(body.filters))

    @app.post("/api/search/image", response_model=Results, operation_id="searchImage",
              summary="Search by an uploaded image",
              description="Send the image as multipart/form-data (field `image`; other fields as "
                          "the query parameters) or as the raw body.",
              responses={**SEARCH_ERRORS, 413: error_answer(f"Over {MAX_UPLOAD_BYTES} bytes.")},
              max_body_size=BODY_LIMITS["/api/search/image"], openapi_extra=IMAGE_BODY)
    async def search_image(params: Annotated[SearchParams, Query()], request: Request):
        pairs = list(request.query_params.multi_items())
        data, params, pairs = await _uploaded_image(request, params, pairs)
        vector = await run_in_threadpool(searcher.embed_image, data)
        return await run_in_threadpool(searcher.search, vector, params.k, params.against,
                                       Filters.from_query(pairs))


async def _uploaded_image(request: Request, params: SearchParams,
                          pairs: list) -> tuple[bytes, SearchParams, list]:
    """The image sent, as a multipart form's `image` field or as the raw body; with the
    parameters and query pairs that hold once a form's other fields are counted."""
    if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        async with request.form(max_files=1, max_fields=MAX_FORM_FIELDS) as form:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise ConfigError("multipart upload without an 'image' file field")
            data = await upload.read()
            fields = [(name, value) for name, value in form.multi_items() if isinstance(value, str)]
        if fields:  # the form's fields count as query parameters, and win over them
            pairs += fields
            params = _checked(SearchParams, dict(pairs))
    else:
        data = await request.body()  # the image itself (image/*, application/octet-stream)
    return data, params, pairs


def _row_routes(app: FastAPI, searcher: Searcher) -> None:
    """The routes about one stored row, named by its id in the path."""

    @app.get("/api/similar/{id:path}", response_model=Results, operation_id="similar",
             responses={**SEARCH_ERRORS, **NOT_FOUND},
             summary="Rows like a stored row (its own vector; no model work)")
    def similar(row_id: Annotated[str, Path(alias="id", description="The row's `id`.")],
                params: Annotated[SearchParams, Query()], request: Request):
        vector = searcher.row_vector(row_id, params.against)
        return searcher.search(vector, params.k, params.against,
                               Filters.from_query(request.query_params.multi_items()))

    @app.get("/api/thumbnail/{id:path}", response_class=Response, operation_id="thumbnail",
             summary="A JPEG thumbnail of the row's image, read by the server",
             responses={200: {"description": "The thumbnail.", "content": {
                            "image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
                        304: {"description": "Not modified (ETag)."},
                        400: error_answer("A size not offered."), **NOT_FOUND,
                        502: error_answer("The image could not be read or decoded."),
                        503: error_answer("Too many images are being read from the row's host: try "
                                          "again after Retry-After seconds.")})
    def thumbnail(row_id: Annotated[str, Path(alias="id", description="The row's `id`.")],
                  request: Request,
                  size: Annotated[int, Query(description="The longest side, in pixels.",
                                             json_schema_extra={"enum": list(THUMBNAIL_SIZES)})]
                  = DEFAULT_THUMBNAIL_SIZE):
        if size not in THUMBNAIL_SIZES:
            raise ConfigError(f"size: choose one of {', '.join(map(str, THUMBNAIL_SIZES))}")
        data, etag = searcher.thumbnail(row_id, size)
        headers = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="image/jpeg", headers=headers)


def _page_routes(app: FastAPI) -> None:
    """The web page, the API's page (/docs) and their files, kept out of the OpenAPI document."""

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    @app.api_route("/index.html", methods=["GET", "HEAD"], include_in_schema=False)
    def page():
        return FileResponse(os.path.join(WEB_DIR, "index.html"), headers={"Cache-Control": "no-cache"})

    @app.api_route("/favicon.ico", methods=["GET", "HEAD"], include_in_schema=False)
    def favicon():
        return FileResponse(os.path.join(WEB_DIR, "favicon.svg"), headers={"Cache-Control": "no-cache"})

    @app.api_route("/docs", methods=["GET", "HEAD"], include_in_schema=False)
    def docs():
        return FileResponse(os.path.join(WEB_DIR, "docs.html"), headers={"Cache-Control": "no-cache"})

    app.mount("/static", NoCacheStatic(directory=WEB_DIR), name="static")
    # Swagger UI's own files, from its package: the API page works where no CDN is reachable.
    app.mount("/docs-assets", StaticFiles(directory=SWAGGER_UI_DIR), name="docs-assets")


class NoStoreJSON(JSONResponse):
    """JSON answers are about a table that changes: never cached."""

    def __init__(self, content: Any, status_code: int = 200, headers: dict | None = None, **kw):
        super().__init__(content, status_code, {"Cache-Control": "no-store", **(headers or {})}, **kw)


class NoCacheStatic(StaticFiles):
    """The page's files, revalidated on each load (a new version is seen at once)."""

    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def _checked(model: type[BaseModel], values: dict) -> BaseModel:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


# ---------------------------------------------------------------------------------------- errors

# pydantic's error types, as the messages this API has always given: `k: 'many' is not an integer`.
_REASONS = {
    "int_parsing": "{value!r} is not an integer",
    "int_type": "{value!r} is not an integer",
    "int_from_float": "{value!r} is not an integer",
    "greater_than_equal": "{value!r} must be at least {ge}",
    "less_than_equal": "{value!r} must be at most {le}",
    "literal_error": "{value!r}; choose {expected}",
    "string_too_long": "at most {max_length} characters",
    "string_type": "expected a string",
    "dict_type": "expected an object of column -> value",
    "model_attributes_type": "expected a JSON object, sent as application/json",
    "missing": "required",
    "extra_forbidden": "not a field of this request (text, k, against, filters)",
    "json_invalid": "not JSON ({error})",
}


def validation_message(errors: list[dict]) -> str:
    """The first of pydantic's errors as one line: where, what was sent, what is wanted."""
    error = errors[0]
    where = ("the body" if error["type"] == "json_invalid"  # its location is a character offset
             else ".".join(str(p) for p in error["loc"] if p not in ("query", "path", "body"))
             or "the body")
    ctx = {k: str(v).replace("'", "") for k, v in (error.get("ctx") or {}).items()}
    template = _REASONS.get(error["type"])
    reason = template.format(value=error.get("input"), **ctx) if template else error["msg"]
    return f"{where}: {reason}"


def _answer_errors(app: FastAPI) -> None:
    """Every refusal as {"error": message}."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return NoStoreJSON({"error": validation_message(exc.errors())}, 400)

    @app.exception_handler(ConfigError)
    async def refused(request: Request, exc: ConfigError):
        return NoStoreJSON({"error": str(exc)}, 400)

    @app.exception_handler(ServeError)
    async def unanswerable(request: Request, exc: ServeError):
        return NoStoreJSON({"error": exc.message}, exc.status, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        path = request.url.path
        message = {404: f"no such path: {path}", 405: f"{request.method} is not allowed on {path}",
                   413: f"the body is over {BODY_LIMITS.get(path, MAX_JSON_BYTES)} bytes, "
                        "at most that many are taken"}.get(exc.status_code, str(exc.detail))
        headers = dict(exc.headers or {})
        if exc.status_code == 413:
            headers["Connection"] = "close"  # rather than read the rest of the body to drop it
        return NoStoreJSON({"error": message}, exc.status_code, headers)


# --------------------------------------------------------------------------------------- OpenAPI

_FILTER_SCHEMAS = {"string": {"type": "string"}, "integer": {"type": "integer"},
                   "number": {"type": "number"}, "boolean": {"type": "boolean"}}
_FILTERED_OPERATIONS = (("/api/search", "get"), ("/api/search/image", "post"),
                        ("/api/similar/{id}", "get"))


def openapi_document(app: FastAPI, searcher: Searcher) -> dict:
    """FastAPI's document of the routes, with the table's own filterable columns added as
    `filter.<column>` (and `min.`/`max.` for numbers) parameters and SearchRequest.filters
    properties; asked anew each time, as a table gains columns between versions."""
    if app.openapi_schema is None:
        app.openapi_schema = get_openapi(
            title=app.title, version=app.version, routes=app.routes,
            description=(f"Search the LanceDB table '{searcher.table_name}' "
                         f"({storage.redact(searcher.model.label)}, {searcher.model.dim}-d, cosine) "
                         "by text in any language or by image. Scores are cosine similarities. "
                         "Filters are exact matches on the table's own columns (see /api/columns), "
                         "applied before ranking."))
        _without_validation_errors(app.openapi_schema)
    spec = copy.deepcopy(app.openapi_schema)
    parameters, properties = [], {}
    for column in searcher.columns():
        schema = dict(_FILTER_SCHEMAS[column["filter"]])
        if column.get("values"):
            schema["enum"] = column["values"]
        parameters.append({
            "name": f"filter.{column['name']}", "in": "query", "required": False,
            "description": f"Only rows whose `{column['name']}` ({column['type']}) equals this; "
                           "repeat the parameter for any of several values.",
            "schema": {"type": "array", "items": schema, "maxItems": MAX_FILTER_VALUES},
            "style": "form", "explode": True})
        numeric = column["filter"] in ("integer", "number")
        if numeric:
            for op, word in (("min", "at least"), ("max", "at most")):
                parameters.append({"name": f"{op}.{column['name']}", "in": "query", "required": False,
                                   "description": f"Only rows whose `{column['name']}` is {word} this.",
                                   "schema": _FILTER_SCHEMAS[column["filter"]]})
        properties[column["name"]] = {"oneOf": [
            schema, {"type": "array", "items": schema},
            {"type": "object", "additionalProperties": False,
             "properties": {"eq": {"oneOf": [schema, {"type": "array", "items": schema}]},
                            **({"min": schema, "max": schema} if numeric else {})}}]}
    for path, method in _FILTERED_OPERATIONS:
        spec["paths"][path][method].setdefault("parameters", []).extend(parameters)
    filters = spec["components"]["schemas"]["SearchRequest"]["properties"]["filters"]
    filters.clear()
    filters.update({"anyOf": [{"type": "object", "properties": properties,
                               "additionalProperties": False}, {"type": "null"}]})
    return spec


def _without_validation_errors(spec: dict) -> None:
    """This API answers a bad parameter with 400 and {"error": ...} (documented per route), not
    FastAPI's 422: its entries would describe answers that never come."""
    for operations in spec["paths"].values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        spec.get("components", {}).get("schemas", {}).pop(name, None)


# ---------------------------------------------------------------------------------------- server


def make_server(searcher: Searcher, host: str = "127.0.0.1", port: int = 8000,
                quiet: bool = False, sock=None) -> AppServer:
    """The app over `searcher` on `sock` (or a new socket listening on host:port); call
    serve_forever() on it. Served on loopback, it answers only requests addressed to loopback."""
    sock = sock or listen(host, port)
    allowed = set(LOOPBACK_NAMES) | {host} if is_loopback(host) else None
    return AppServer(make_app(searcher, allowed), sock, quiet)
