#!/usr/bin/env bash
# A throwaway PostgreSQL server for the cache tests, on 127.0.0.1 and a free port.
#
#   source .ci/postgres.sh   # exports AUTOTUNE_TEST_POSTGRES_URL; the server stops when the shell exits
#   bash .ci/postgres.sh     # starts it, prints the export line and how to stop it, leaves it running
#
# Installs Debian's `postgresql` package when no server binaries are found (needs root). The cluster
# lives in a temporary directory, runs as the `postgres` system user when started by root (initdb refuses
# root), trusts loopback connections, and runs with fsync off: it holds test data only.

_autotune_pg_main() {
    local bindir datadir port runas=() url
    bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$bindir" ] || [ ! -x "$bindir/pg_ctl" ]; then
        if [ "$(id -u)" != 0 ]; then
            echo "postgres.sh: PostgreSQL is not installed and installing it needs root" >&2
            return 1
        fi
        echo "postgres.sh: installing postgresql from Debian's packages" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || return 1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null \
            || return 1
        bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
        [ -x "$bindir/pg_ctl" ] || { echo "postgres.sh: no pg_ctl after installing" >&2; return 1; }
    fi

    datadir=$(mktemp -d "${TMPDIR:-/tmp}/autotune-pg.XXXXXX") || return 1
    if [ "$(id -u)" = 0 ]; then
        id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/sh postgres \
            || return 1
        chown postgres: "$datadir"
        runas=(runuser -u postgres --)
    fi
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') \
        || return 1

    "${runas[@]}" "$bindir/initdb" -D "$datadir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 \
        >"$datadir/initdb.log" 2>&1 \
        || { echo "postgres.sh: initdb failed:" >&2; cat "$datadir/initdb.log" >&2; return 1; }
    "${runas[@]}" "$bindir/pg_ctl" -D "$datadir/data" -l "$datadir/server.log" -w -t 60 start \
        -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$datadir -c fsync=off" \
        -o "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100" >/dev/null \
        || { echo "postgres.sh: the server did not start:" >&2; cat "$datadir/server.log" >&2; return 1; }
    "${runas[@]}" "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres autotune_test \
        || { echo "postgres.sh: createdb failed" >&2; return 1; }

    url="postgresql+psycopg://postgres@127.0.0.1:$port/autotune_test"
    export AUTOTUNE_TEST_POSTGRES_URL="$url"
    export AUTOTUNE_TEST_POSTGRES_STOP="${runas[*]} $bindir/pg_ctl -D $datadir/data -m immediate stop"
    export AUTOTUNE_TEST_POSTGRES_DIR="$datadir"
    echo "postgres.sh: PostgreSQL on 127.0.0.1:$port (data in $datadir)" >&2
}

autotune_pg_stop() {
    if [ -n "${AUTOTUNE_TEST_POSTGRES_STOP:-}" ]; then
        $AUTOTUNE_TEST_POSTGRES_STOP >/dev/null 2>&1 || true
        rm -rf "${AUTOTUNE_TEST_POSTGRES_DIR:?}"
        unset AUTOTUNE_TEST_POSTGRES_URL AUTOTUNE_TEST_POSTGRES_STOP AUTOTUNE_TEST_POSTGRES_DIR
    fi
}

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
    _autotune_pg_main || return 1
    trap autotune_pg_stop EXIT
else
    set -euo pipefail
    _autotune_pg_main
    echo "export AUTOTUNE_TEST_POSTGRES_URL=$AUTOTUNE_TEST_POSTGRES_URL"
    echo "# stop with: $AUTOTUNE_TEST_POSTGRES_STOP && rm -rf $AUTOTUNE_TEST_POSTGRES_DIR" >&2
fi
