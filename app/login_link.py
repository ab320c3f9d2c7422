"""``uws login-link``: a one-time link that signs a user in to the web page (``/ui/``).

Like Jupyter's token URL: whoever opens it first within its lifetime gets the user's
browser session, so it goes to that user alone (a terminal, a message they asked for).
A user who has never signed in is created first when an e-mail is given, exactly as a
sign-in through the configured method would create them (OS account included), unless
that method is an identity provider's: its users exist only once it has vouched for them.
"""

from __future__ import annotations

from datetime import timedelta

from controllers.base import UserInfo
from controllers.registry import Controllers


class UnknownUser(Exception):
    pass


async def login_link(database_url: str, controllers: Controllers, username: str, *,
                     email: str | None, base_url: str, minutes: float) -> str:
    from api.sign_in import admit
    from db import accounts
    from db.engine import close_engine, open_engine

    engine = await open_engine(database_url, min_size=1, max_size=2)
    try:
        user_id = await accounts.user_id_named(username)
        if user_id is None:
            if controllers.api_auth.takes_auth_token:
                # An account made here would be bound to no identity, and the first one
                # the provider vouches for under that name would inherit it.
                raise UnknownUser(f"no user {username!r}: with {controllers.api_auth.name}, "
                                  "a user is created by their first sign-in through it")
            if not email:
                raise UnknownUser(f"no user {username!r}: give --email to create them")
            user_id = await admit(controllers.api_auth, UserInfo(username=username, email=email))
        ticket = await accounts.issue_login_ticket(user_id, timedelta(minutes=minutes))
    finally:
        await close_engine(engine)
    return f"{base_url.rstrip('/')}/ui/login/?ticket={ticket}"
