"""What ``uws dev`` prints once everything is up: where things are, and the one request
that gets a user token with the sign-in method the configuration actually uses."""

from __future__ import annotations

from controllers.base import AuthMethod


def sign_in_example(method: AuthMethod, api: str, client_token: str,
                    username: str = "alice") -> str:
    """The ``curl`` for ``POST /tokens/`` with ``method``'s body: a trusted client vouching
    for a user, or a token of the method's identity provider."""
    head = f"    curl -s -X POST {api}/tokens/ -H 'Content-Type: application/json' \\\n"
    if method.takes_auth_token:
        return (f"  get a user token ({method.name}: {method.token_source}):\n{head}"
                "      -d '{\"auth_token\": \"<access token>\"}'\n")
    return (f"  get a user token ({method.name}):\n{head}"
            f"      -d '{{\"client_token\": \"{client_token}\", \"user_info\": "
            f"{{\"username\": \"{username}\", \"email\": \"{username}@localhost\"}}}}'\n")


def banner(*, method: AuthMethod, api: str, temporal_ui: str, data_dir: str,
           client_name: str, client_token: str, page_user: str = "alice",
           page_link: str = "") -> str:
    return (f"\nuws is running\n"
            f"  web page     {page_link or api + '/ui/'}  (signs in {page_user}, once)\n"
            f"  API          {api}/  (OpenAPI: /schema/swagger)\n"
            f"  Temporal UI  {temporal_ui}/\n"
            f"  data         {data_dir}\n"
            f"  api_clients token ({client_name}): {client_token}\n\n"
            f"{sign_in_example(method, api, client_token, page_user)}\n"
            "Ctrl-C stops everything.\n")
