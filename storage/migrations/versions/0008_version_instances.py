"""version_instances: the fixed set of instances of each queued study version

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "version_instances",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_version", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["study_instance_uid"], ["studies.study_instance_uid"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "study_instance_uid", "study_version", "sop_instance_uid", name="uq_version_instances"
        ),
    )


def downgrade() -> None:
    op.drop_table("version_instances")
