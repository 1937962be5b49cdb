"""api_calls: what each request disclosed (issue 13's audit trail): the endpoint's host, the
SHA-256 of each image, of the prompt and of the whole request body, its size, and when it left

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

from storage.models import UTCDateTime

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_calls") as batch:
        batch.add_column(sa.Column("endpoint_host", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("image_sha256", sa.Text(), nullable=True))
        batch.add_column(sa.Column("prompt_sha256", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("request_sha256", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("request_bytes", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("sent_at", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_calls") as batch:
        for column in (
            "sent_at",
            "request_bytes",
            "request_sha256",
            "prompt_sha256",
            "image_sha256",
            "endpoint_host",
        ):
            batch.drop_column(column)
