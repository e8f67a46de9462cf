"""Alembic environment: runs on the engine the caller passes in `config.attributes`."""

from alembic import context
from sqlalchemy import Engine

import storage.models  # noqa: F401  (registers the tables on the metadata)
from sqlmodel import SQLModel

from storage.engine import make_engine

config = context.config
target_metadata = SQLModel.metadata


def _engine() -> Engine:
    engine = config.attributes.get("engine")
    if engine is not None:
        return engine
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("alembic: no engine given and no sqlalchemy.url set")
    return make_engine(url)


def run_migrations_online() -> None:
    with _engine().connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
