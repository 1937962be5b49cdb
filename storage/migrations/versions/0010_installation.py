"""installation: this installation's random value, the namespace of the UIDs it makes

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-25
"""

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "installation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("uid_namespace", sa.String(length=36), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(table, [{"id": 1, "uid_namespace": str(uuid.uuid4())}])


def downgrade() -> None:
    op.drop_table("installation")
