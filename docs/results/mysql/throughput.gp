# Workload throughput per mode, with the noisy neighbour on y2 and the migration events.
# Written by Workloads/bench/report.py; regenerate with: cd OUT_DIR && gnuplot throughput.gp
# Data: plotdata/<dir>-load.dat (ops/s per load interval, x = s since load start, drawn as steps
# over each interval) and plotdata/<dir>-neighbour.dat (neighbour work units/s).
set encoding utf8
do for [fmt in "png svg"] {
  if (fmt eq "png") {
    set terminal pngcairo noenhanced size 1200,960 font "sans,10"
    set output "throughput.png"
  } else {
    set terminal svg noenhanced size 1200,960 dynamic font "sans,10" background rgb "white"
    set output "throughput.svg"
  }
  set multiplot layout 3,1
  set xrange [0.000:60.110]
  set grid xtics ytics lc rgb "#dddddd"
  set xlabel "s since load start"
  set key bottom left opaque box samplen 2 font ",8"
  set tics out
  set border 11
  unset arrow
  unset label
  set title "mysql enlightened: downtime 59 ms, T_release 2,726 ms"
  set yrange [0:48.000]
  set ylabel "workload transactions/s"
  set y2range [0:1860.000]
  set y2tics
  set ytics nomirror
  set y2label "neighbour units/s"
  set border 15
  set arrow from 10.000, graph 0 to 10.000, graph 1 nohead lc rgb "#7f7f7f" dt 3 lw 1.2 front
  set label "contention" at 10.000, graph 0.97 left offset char 0.3,0 tc rgb "#7f7f7f" font ",8" front
  set arrow from 20.000, graph 0 to 20.000, graph 1 nohead lc rgb "#2ca02c" dt 2 lw 1.2 front
  set label "migrate" at 20.000, graph 0.91 left offset char 0.3,0 tc rgb "#2ca02c" font ",8" front
  set arrow from 20.714, graph 0 to 20.714, graph 1 nohead lc rgb "#d62728" dt 1 lw 1.2 front
  set label "STOP" at 20.714, graph 0.85 left offset char 0.3,0 tc rgb "#d62728" font ",8" front
  set arrow from 20.773, graph 0 to 20.773, graph 1 nohead lc rgb "#9467bd" dt 1 lw 1.2 front
  set label "RESUME" at 20.773, graph 0.79 left offset char 0.3,0 tc rgb "#9467bd" font ",8" front
  set arrow from 21.722, graph 0 to 21.722, graph 1 nohead lc rgb "#8c564b" dt 4 lw 1.2 front
  set label "switch" at 21.722, graph 0.73 left offset char 0.3,0 tc rgb "#8c564b" font ",8" front
  set arrow from 26.483, graph 0 to 26.483, graph 1 nohead lc rgb "#17becf" dt 2 lw 1.2 front
  set label "end" at 26.483, graph 0.67 left offset char 0.3,0 tc rgb "#17becf" font ",8" front
  set arrow from graph 0, first 8.100 to graph 1, first 8.100 nohead lc rgb "#1f77b4" dt 3 lw 0.8 back
  set arrow from graph 0, second 551.127 to graph 1, second 551.127 nohead lc rgb "#ff7f0e" dt 3 lw 0.8 back
  plot "plotdata/mysql-enlightened-load.dat" using 1:2 with steps lw 2 lc rgb "#1f77b4" title "workload transactions/s", \
       "plotdata/mysql-enlightened-neighbour.dat" using 1:2 axes x1y2 with steps lw 1 lc rgb "#ff7f0e" title "neighbour units/s"
  unset y2label
  unset arrow
  unset label
  set title "mysql postcopy: downtime 343 ms, T_release 21,507 ms"
  set yrange [0:24.000]
  set ylabel "workload transactions/s"
  set y2range [0:936.000]
  set y2tics
  set ytics nomirror
  set y2label "neighbour units/s"
  set border 15
  set arrow from 10.002, graph 0 to 10.002, graph 1 nohead lc rgb "#7f7f7f" dt 3 lw 1.2 front
  set label "contention" at 10.002, graph 0.97 left offset char 0.3,0 tc rgb "#7f7f7f" font ",8" front
  set arrow from 20.056, graph 0 to 20.056, graph 1 nohead lc rgb "#2ca02c" dt 2 lw 1.2 front
  set label "migrate" at 20.056, graph 0.91 left offset char 0.3,0 tc rgb "#2ca02c" font ",8" front
  set arrow from 28.582, graph 0 to 28.582, graph 1 nohead lc rgb "#d62728" dt 1 lw 1.2 front
  set label "STOP" at 28.582, graph 0.85 left offset char 0.3,0 tc rgb "#d62728" font ",8" front
  set arrow from 28.924, graph 0 to 28.924, graph 1 nohead lc rgb "#9467bd" dt 1 lw 1.2 front
  set label "RESUME" at 28.924, graph 0.79 left offset char 0.3,0 tc rgb "#9467bd" font ",8" front
  set arrow from 33.995, graph 0 to 33.995, graph 1 nohead lc rgb "#8c564b" dt 4 lw 1.2 front
  set label "switch" at 33.995, graph 0.73 left offset char 0.3,0 tc rgb "#8c564b" font ",8" front
  set arrow from 46.274, graph 0 to 46.274, graph 1 nohead lc rgb "#17becf" dt 2 lw 1.2 front
  set label "end" at 46.274, graph 0.67 left offset char 0.3,0 tc rgb "#17becf" font ",8" front
  set arrow from graph 0, first 2.340 to graph 1, first 2.340 nohead lc rgb "#1f77b4" dt 3 lw 0.8 back
  set arrow from graph 0, second 552.436 to graph 1, second 552.436 nohead lc rgb "#ff7f0e" dt 3 lw 0.8 back
  plot "plotdata/mysql-postcopy-load.dat" using 1:2 with steps lw 2 lc rgb "#1f77b4" title "workload transactions/s", \
       "plotdata/mysql-postcopy-neighbour.dat" using 1:2 axes x1y2 with steps lw 1 lc rgb "#ff7f0e" title "neighbour units/s"
  unset y2label
  unset arrow
  unset label
  set title "mysql precopy: downtime 80 ms, T_release 16,851 ms"
  set yrange [0:48.000]
  set ylabel "workload transactions/s"
  set y2range [0:2010.000]
  set y2tics
  set ytics nomirror
  set y2label "neighbour units/s"
  set border 15
  set arrow from 10.000, graph 0 to 10.000, graph 1 nohead lc rgb "#7f7f7f" dt 3 lw 1.2 front
  set label "contention" at 10.000, graph 0.97 left offset char 0.3,0 tc rgb "#7f7f7f" font ",8" front
  set arrow from 20.000, graph 0 to 20.000, graph 1 nohead lc rgb "#2ca02c" dt 2 lw 1.2 front
  set label "migrate" at 20.000, graph 0.91 left offset char 0.3,0 tc rgb "#2ca02c" font ",8" front
  set arrow from 36.515, graph 0 to 36.515, graph 1 nohead lc rgb "#d62728" dt 1 lw 1.2 front
  set label "STOP" at 36.515, graph 0.85 left offset char 0.3,0 tc rgb "#d62728" font ",8" front
  set arrow from 36.595, graph 0 to 36.595, graph 1 nohead lc rgb "#9467bd" dt 1 lw 1.2 front
  set label "RESUME" at 36.595, graph 0.79 left offset char 0.3,0 tc rgb "#9467bd" font ",8" front
  set arrow from 36.975, graph 0 to 36.975, graph 1 nohead lc rgb "#8c564b" dt 4 lw 1.2 front
  set label "switch" at 36.975, graph 0.73 left offset char 0.3,0 tc rgb "#8c564b" font ",8" front
  set arrow from 40.097, graph 0 to 40.097, graph 1 nohead lc rgb "#17becf" dt 2 lw 1.2 front
  set label "end" at 40.097, graph 0.67 left offset char 0.3,0 tc rgb "#17becf" font ",8" front
  set arrow from graph 0, first 6.660 to graph 1, first 6.660 nohead lc rgb "#1f77b4" dt 3 lw 0.8 back
  set arrow from graph 0, second 703.955 to graph 1, second 703.955 nohead lc rgb "#ff7f0e" dt 3 lw 0.8 back
  plot "plotdata/mysql-precopy-load.dat" using 1:2 with steps lw 2 lc rgb "#1f77b4" title "workload transactions/s", \
       "plotdata/mysql-precopy-neighbour.dat" using 1:2 axes x1y2 with steps lw 1 lc rgb "#ff7f0e" title "neighbour units/s"
  unset y2label
  unset multiplot
  unset output
}
