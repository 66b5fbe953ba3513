"""resumable training: resume states, pause, lost attempts, worker event numbers

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 22:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "resume_states",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("storage_key", sa.String(length=512), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_resume_states_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_resume_states")),
        sa.UniqueConstraint("id", name=op.f("uq_resume_states_id")),
    )
    with op.batch_alter_table("resume_states", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_resume_states_job_id"), ["job_id"], unique=False)

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("pause_requested", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("lost_attempts", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("resumable_step", sa.Integer(), nullable=True))
    # Attempts counted so far were all lost or final ones; keep the retry budget they had.
    op.execute("UPDATE jobs SET lost_attempts = CASE WHEN attempt > 0 THEN attempt - 1 ELSE 0 END")

    with op.batch_alter_table("job_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("attempt", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("worker_seq", sa.Integer(), nullable=True))
        batch_op.create_unique_constraint(
            "uq_job_events_job_attempt_worker_seq", ["job_id", "attempt", "worker_seq"]
        )


def downgrade() -> None:
    with op.batch_alter_table("job_events", schema=None) as batch_op:
        batch_op.drop_constraint("uq_job_events_job_attempt_worker_seq", type_="unique")
        batch_op.drop_column("worker_seq")
        batch_op.drop_column("attempt")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("resumable_step")
        batch_op.drop_column("lost_attempts")
        batch_op.drop_column("pause_requested")
    with op.batch_alter_table("resume_states", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_resume_states_job_id"))
    op.drop_table("resume_states")
