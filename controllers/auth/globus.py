"""``GlobusUserAuthentication``: the reference's Globus token flow.

A portal posts ``{"auth_token": "<the user's Globus Groups token>"}``. We introspect it at
Globus Auth (``POST /v2/oauth2/token/introspect`` with our client's basic credentials and
``include=identity_set``), require it active, unexpired, issued by Globus and meant for us
(its ``aud`` among ``allowed_audiences``; its ``client_id`` too only with
``accept_client_id_as_audience``), take the identity's username, email and name, and, when
``allowed_globus_groups`` is set, require an active membership in one of them through the
Groups API (``GET /v2/groups/my_groups`` with the user's token), as the reference does for
new users; we check at every sign-in.

The account is bound to the Globus identity id (the introspection's ``sub``); the UWS
username is the Globus username (``alice@uni.edu``) it had at the first sign-in, not the
reference's e-mail local part, which two people at different institutions can share.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlencode

from pydantic import Field, field_validator

from controllers.auth import external
from controllers.auth.external import ExternalAuthSettings, ExternalUserAuthentication
from controllers.base import Health, UserInfo
from controllers.errors import BackendError, Forbidden


class GlobusUserAuthentication(ExternalUserAuthentication):
    class Settings(ExternalAuthSettings):
        client_id: str = Field(min_length=1)
        client_secret_env: str = Field(description="Environment variable holding the secret.")
        auth_base_url: str = "https://auth.globus.org"
        groups_base_url: str = "https://groups.api.globus.org"
        issuer: str = "https://auth.globus.org"
        allowed_audiences: list[str] = Field(
            default_factory=list, description="Empty: the token must be for client_id."
        )
        accept_client_id_as_audience: bool = Field(
            False, description="A token issued to one of allowed_audiences (its client_id) "
                               "passes even when its aud does not name it.")
        allowed_globus_groups: list[str] = Field(
            default_factory=list, description="Group ids; empty: no group is required."
        )
        web_sign_in: bool = Field(
            False, description="The web page's \"Sign in with Globus\": the authorization "
                               "code flow with this client (redirect URI "
                               "<server>/ui/login/callback/ registered at Globus).")
        web_scope: str = ("openid profile email "
                          "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships")

        @field_validator("client_secret_env")
        @classmethod
        def _secret_set(cls, value: str) -> str:
            return external.env_is_set(value)

    settings: Settings

    @property
    def token_source(self) -> str:
        return f"a Globus Auth access token issued to client {self.settings.client_id}"

    @property
    def web_sign_in(self) -> bool:
        return self.settings.web_sign_in

    async def authorization_request(self, redirect_uri: str, state: str, challenge: str) -> str:
        s = self.settings
        params = {"response_type": "code", "client_id": s.client_id,
                  "redirect_uri": redirect_uri, "scope": s.web_scope, "state": state,
                  "code_challenge": challenge, "code_challenge_method": "S256"}
        return f"{s.auth_base_url.rstrip('/')}/v2/oauth2/authorize?{urlencode(params)}"

    async def redeem_code(self, code: str, verifier: str, redirect_uri: str) -> str:
        """The token sign-in checks, from Globus's answer for the code: with groups to
        check, the Groups API's token (the reference's "Globus Groups token"), else the
        first one."""
        s = self.settings
        response = await self._call(
            "POST", f"{s.auth_base_url.rstrip('/')}/v2/oauth2/token",
            data={"grant_type": "authorization_code", "code": code,
                  "redirect_uri": redirect_uri, "code_verifier": verifier},
            auth=(s.client_id, os.environ.get(s.client_secret_env, "")))
        body = self._json(response, "Globus token endpoint") \
            if response.status_code == 200 else None
        if not isinstance(body, dict):
            raise external.reject(f"Globus token endpoint answered {response.status_code}: "
                         f"{response.text[:200]}")
        tokens = [body, *[t for t in body.get("other_tokens") or [] if isinstance(t, dict)]]
        wanted = GROUPS_RESOURCE_SERVER if s.allowed_globus_groups else None
        chosen = next((t for t in tokens if t.get("resource_server") == wanted), tokens[0])
        token = chosen.get("access_token")
        if not isinstance(token, str) or not token:
            raise external.reject("Globus token endpoint answered no access token")
        return token

    def _introspect_url(self) -> str:
        return f"{self.settings.auth_base_url.rstrip('/')}/v2/oauth2/token/introspect"

    async def _probe(self) -> Health:
        s = self.settings
        return await self._probe_introspection(
            self._introspect_url(), {}, (s.client_id, os.environ.get(s.client_secret_env, "")))

    async def _verify(self, token: str) -> tuple[UserInfo, float | None]:
        s = self.settings
        data = await self._introspect(
            self._introspect_url(),
            {"token": token, "include": "identity_set"},
            (s.client_id, os.environ.get(s.client_secret_env, "")), "Globus introspection",
        )
        # Globus leaves iss out at times; when it is there it must be Globus's.
        external.check_introspected(data, audiences=set(s.allowed_audiences or [s.client_id]),
                           issuer=s.issuer, leeway=0.0, require_exp=True, require_iss=False,
                           client_id_is_audience=s.accept_client_id_as_audience)
        exp = data["exp"]
        username, email = data.get("username"), data.get("email")
        if not isinstance(username, str) or not username or len(username) > 150:
            raise external.reject("Globus identity without a usable username")
        if not isinstance(email, str) or not email or len(email) > 254:
            raise external.reject(f"Globus identity {username!r} has no e-mail")
        subject = external.subject_of(data, f"Globus identity {username!r}")
        if s.allowed_globus_groups:
            identities = set(external.as_list(data.get("identity_set"))) \
                or set(external.as_list(data.get("sub")))
            await self._require_group(token, identities, username)
        first, _, last = (data.get("name") or "").strip().partition(" ")
        # Display names only: cut to the columns' 150 rather than refuse.
        # The issuer is the configured one: an iss in the answer was checked against it.
        info = UserInfo(username=username, email=email, first_name=first[:150],
                        last_name=last.strip()[:150], issuer=s.issuer, subject=subject)
        return info, float(exp)

    async def _require_group(self, token: str, identities: set[str], username: str) -> None:
        s = self.settings
        response = await self._call(
            "GET", f"{s.groups_base_url.rstrip('/')}/v2/groups/my_groups",
            headers={"Authorization": f"Bearer {token}"},
        )
        if response.status_code in (401, 403):
            raise external.reject(f"Groups API refused {username!r}'s token (no groups scope?)")
        if response.status_code != 200:
            raise BackendError(external.MISCONFIGURED, log_message=(
                f"Groups API answered {response.status_code}: {response.text[:200]}"
            ))
        groups = self._json(response, "Groups API")
        if not isinstance(groups, list):
            raise BackendError(external.MISCONFIGURED, log_message="Groups API answered a non-list")
        allowed = set(s.allowed_globus_groups)
        if not any(_active_member(g, identities) for g in groups
                   if isinstance(g, dict) and g.get("id") in allowed):
            # Known but not admitted: the reference server's 403 and wording.
            raise Forbidden(NOT_IN_GROUPS, log_message=(
                f"{username!r} is in none of the allowed Globus groups"))


GROUPS_RESOURCE_SERVER = "groups.api.globus.org"
NOT_IN_GROUPS = ("User is not a member of any allowed Globus groups. "
                 "Please contact your administrator for access.")


def _active_member(group: dict[str, Any], identities: set[str]) -> bool:
    """Whether one of the user's linked identities holds an active membership."""
    memberships = group.get("my_memberships")
    if not isinstance(memberships, list):
        return True  # my_groups lists only groups the caller belongs to
    return any(isinstance(m, dict) and m.get("status") == "active"
               and (not identities or m.get("identity_id") in identities)
               for m in memberships)
