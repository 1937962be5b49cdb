"""delivery_attempts: one row per delivery attempt when it ends (destination, when, outcome,
status, error), the study page's delivery history; job_claims: each claim of an analysis (when,
by which worker); console_logouts: sessions logged out before
they expire (sessions now survive a restart, so a logout must too); indexes for the studies
page's one row per study version, newest first (current versions by settle time, the studies
that have earlier versions, a version's deliveries by state)

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

from storage.models import UTCDateTime

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "delivery_attempts",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("outbox_id", sa.BigInteger(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_version", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("ended_at", UTCDateTime(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_delivery_attempts_study_instance_uid", "delivery_attempts", ["study_instance_uid"])
    op.create_table(
        "job_claims",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("job_id", sa.BigInteger(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_version", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("claimed_at", UTCDateTime(), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_job_claims_study_instance_uid", "job_claims", ["study_instance_uid"])
    op.create_table(
        "console_logouts",
        sa.Column("session", sa.String(length=64), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("session"),
    )
    op.create_index(
        "ix_outbox_study_version_state", "outbox", ["study_instance_uid", "study_version", "state"]
    )
    op.create_index("ix_studies_settle_at", "studies", ["settle_at"])
    op.create_index("ix_studies_version", "studies", ["version"])


def downgrade() -> None:
    op.drop_index("ix_studies_version", table_name="studies")
    op.drop_index("ix_studies_settle_at", table_name="studies")
    op.drop_index("ix_outbox_study_version_state", table_name="outbox")
    op.drop_table("console_logouts")
    op.drop_index("ix_job_claims_study_instance_uid", table_name="job_claims")
    op.drop_table("job_claims")
    op.drop_index("ix_delivery_attempts_study_instance_uid", table_name="delivery_attempts")
    op.drop_table("delivery_attempts")
