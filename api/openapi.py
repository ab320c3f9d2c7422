"""The OpenAPI description, exact for client generators.

Litestar generates the operations from the handlers: ``operation_id``, docstrings, the
``ResponseSpec`` of every status an operation answers (``api.schemas``), the security
requirement. Two things it cannot know are added here, each in one place:

- request bodies: handlers read them by hand (see ``api.schemas``), so each declares its
  body model through ``contract(body=...)``, which documents it on the operation; msgspec
  generates those models' schemas, merged into the components when the document is built;
- trailing slashes: Litestar's router drops them, the contract's paths all have them (the
  server redirects or serves the slashed path, ``api.slashes``), so the document gets them
  back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import msgspec
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import (
    Components,
    Example,
    OpenAPI,
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    Parameter,
    Reference,
    RequestBody,
    Schema,
    SecurityRequirement,
    SecurityScheme,
    Tag,
)

from api import schemas
from core.config import ParameterConfig

API_KEY = "UWSToken"
AUTHENTICATED: list[SecurityRequirement] = [{API_KEY: []}]

_ERRORS = {
    400: "Invalid input or a request the resource's state refuses; `message` says which.",
    401: "`UWS-Authorization` missing (protected endpoints), malformed or unknown.",
    403: "Not allowed for this caller.",
    404: "No such id for the caller (someone else's answers the same).",
    409: "The username is already bound to another identity.",
    413: "The body is larger than this server accepts.",
    422: "`resource_options` fail the configured parameters.",
    500: "A symlink source or the workspace directory is missing on the server.",
    503: "The database or the workflow service is unavailable; retry later.",
    507: "The storage is full.",
}
_OK = "Success; `message` in the contract's words."
_IDS = {
    "workspace_id": "A workspace's id (an integer; one that is not the caller's answers as a "
                    "missing one).",
    "job_id": "A job's id (an integer; one that is not the caller's answers as a missing one).",
    "shared_workspace_id": "A share's id: the id of the recipient's copy.",
}

_TEXT = """\
Workspaces, interactive sessions and batch jobs; every job is a durable Temporal workflow.

Authenticate with the header `UWS-Authorization: Token <key>` (the key from
`POST /tokens/`). Every path ends with a slash. Every JSON answer carries `success` and
`message`; errors are `{"success": false, "message": "..."}`.

Not described as operations, since OpenAPI has no WebSockets:

- `ws /jobs/{job_id}/`: the caller's job, as JSON messages
  `{"id", "workspace_id", "status", "current_job_details"}`: its state when the socket
  opens, then every change. The token goes in the `UWS-Authorization` header or, from a
  browser, as `?token=<key>`. Closes with 4401 without a valid token and 4404 for a job
  that is not the caller's.
- `ws /jobs/`: the same messages for every job of the caller (active ones when it opens).
- `/passthrough/{hostname}/{job_id}/{path}` (HTTP and WebSocket): the relay to a running
  session; the links in `connection_details` lead there.
"""

TAGS = [
    Tag(name="tokens", description="Sign-in: a user's API key."),
    Tag(name="workspaces", description="Private directories, their files and jobs."),
    Tag(name="jobs", description="Sessions and batch jobs (live status: the WebSockets "
                                 "in the description above)."),
    Tag(name="shared workspaces", description="Copies of a workspace offered to others."),
    Tag(name="users", description="Finding people to share with; one's own quota."),
    Tag(name="catalogue", description="Job types, parameters and server status (public)."),
]


def _json_body(model: type[msgspec.Struct], examples: dict[str, Any]) -> RequestBody:
    return RequestBody(
        required=True,
        content={"application/json": OpenAPIMediaType(
            schema=Reference(ref=f"#/components/schemas/{model.__name__}"),
            examples={name: Example(value=value) for name, value in examples.items()} or None,
        )},
    )


UPLOAD_BODY = RequestBody(
    required=True,
    description="Each file part lands in the workspace root under its filename (any "
                "field name will do).",
    content={"multipart/form-data": OpenAPIMediaType(schema=Schema(
        type=OpenAPIType.OBJECT,
        required=["files"],
        properties={"files": Schema(type=OpenAPIType.ARRAY, items=Schema(
            type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY))},
    ))},
)


def query(name: str, description: str, kind: OpenAPIType = OpenAPIType.STRING,
          enum: Sequence[str] = ()) -> Parameter:
    """A filter the handler reads from the query string itself (an absent one: no filter;
    a repeated one: its last value, as the reference's Django did)."""
    return Parameter(name=name, param_in="query", required=False, description=description,
                     schema=Schema(type=kind, enum=list(enum) or None))


def contract(summary: str, ok: type[msgspec.Struct], *errors: int,
             body: type[msgspec.Struct] | None = None, examples: dict[str, Any] | None = None,
             upload: bool = False, filters: Sequence[Parameter] = (),
             auth: bool = True) -> dict[str, Any]:
    """Route-decorator arguments documenting one operation: its summary, the 200 model, the
    error statuses it answers (each with the envelope), its body and query filters."""
    responses = {200: ResponseSpec(ok, generate_examples=False, description=_OK)}
    responses |= {code: ResponseSpec(schemas.ErrorResponse, generate_examples=False,
                                     description=_ERRORS[code]) for code in errors}
    declared = {str(code) for code in responses}
    request_body = UPLOAD_BODY if upload else \
        _json_body(body, examples or {}) if body is not None else None

    @dataclass
    class Documented(Operation):
        def __post_init__(self) -> None:
            # Litestar adds its own 400 shape to any handler with path parameters; ours
            # answer only what is declared, always in the envelope.
            self.responses = {k: v for k, v in (self.responses or {}).items() if k in declared}
            if self.description:  # docstrings quote code reST-style; the document is Markdown
                self.description = self.description.replace("``", "`")
            for parameter in self.parameters or []:
                if isinstance(parameter, Parameter) and parameter.param_in == "path":
                    parameter.description = _IDS.get(parameter.name, parameter.description)
            if request_body is not None:
                self.request_body = request_body
            if filters:
                self.parameters = [*(self.parameters or []), *filters]

    return {"summary": summary, "responses": responses, "operation_class": Documented,
            "security": AUTHENTICATED if auth else None}


def _request_schemas(parameters: Sequence[ParameterConfig]) -> dict[str, Any]:
    """The request models' schemas, ``resource_options`` spelled out from the configured
    parameters (so a generated client knows their names and bounds)."""
    _, components = msgspec.json.schema_components(
        schemas.REQUEST_MODELS, ref_template="#/components/schemas/{name}")
    for schema in components.values():
        if not schema.get("required"):
            schema.pop("required", None)  # an empty list is no constraint
    options: dict[str, Any] = {"type": "object", "properties": {}}
    types = {"int": "integer", "float": "number", "str": "string", "bool": "boolean"}
    for p in parameters:
        prop: dict[str, Any] = {"title": p.display_name}
        if p.description:
            prop["description"] = p.description
        if p.validation.type:
            prop["type"] = types[p.validation.type]
        if p.validation.min is not None:
            prop["minimum"] = p.validation.min
        if p.validation.max is not None:
            prop["maximum"] = p.validation.max
        if p.default_value is not None:
            prop["default"] = p.default_value
        options["properties"][p.variable_name] = prop
    required = [p.variable_name for p in parameters if p.validation.required]
    if required:
        options["required"] = required
    components["ResourceOptions"] = {
        **options, "description": components["JobStart"]["properties"]["resource_options"]
        .get("description", "")}
    components["JobStart"]["properties"]["resource_options"] = {
        "$ref": "#/components/schemas/ResourceOptions"}
    return components


@dataclass
class ContractOpenAPI(OpenAPI):
    """The document Litestar builds, with the request schemas and the slashed paths."""

    request_schemas: dict[str, Any] = field(default_factory=dict)

    @property
    def _exclude_fields(self) -> set[str]:
        return {"request_schemas"}

    def to_schema(self) -> dict[str, Any]:
        document = super().to_schema()
        document["paths"] = {
            path if path.endswith("/") else f"{path}/": item
            for path, item in document.get("paths", {}).items()
        }
        generated = document.setdefault("components", {}).setdefault("schemas", {})
        if clash := set(generated) & set(self.request_schemas):
            raise RuntimeError(f"request and response models share names: {sorted(clash)}")
        merged = {**generated, **self.request_schemas}
        document["components"]["schemas"] = {name: merged[name] for name in sorted(merged)}
        return document


@dataclass
class ContractOpenAPIConfig(OpenAPIConfig):
    parameters: Sequence[ParameterConfig] = ()

    def to_openapi_schema(self) -> OpenAPI:
        base = super().to_openapi_schema()
        return ContractOpenAPI(**{f.name: getattr(base, f.name) for f in fields(OpenAPI)},
                               request_schemas=_request_schemas(self.parameters))


def openapi_config(parameters: Sequence[ParameterConfig]) -> OpenAPIConfig:
    return ContractOpenAPIConfig(
        title="User Workspaces Server",
        version="1.0.5",
        description=_TEXT,
        tags=TAGS,
        use_handler_docstrings=True,
        components=Components(security_schemes={API_KEY: SecurityScheme(
            type="apiKey", name="UWS-Authorization", security_scheme_in="header",
            description="`Token <key>`: the word Token, a space, the key.",
        )}),
        parameters=parameters,
    )
